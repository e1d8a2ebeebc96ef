use candle_core::{Device, Tensor};
use differnet::flow::{nll_loss, FlowConfig, NormalizingFlow};
use differnet::optim::{Adam, AdamConfig};
fn main() {
    let d = Device::Cpu;
    let flow = NormalizingFlow::new(FlowConfig::new(960), 0, &d).unwrap();
    let mut adam = Adam::new(flow.named_parameters().into_iter().map(|(_, v)| v.clone()).collect(), AdamConfig::default());
    let y = Tensor::randn(0f32, 1., (96, 960), &d).unwrap();
    for i in 0..4 {
        let t = std::time::Instant::now();
        let (z, ld) = flow.forward(&y).unwrap();
        let loss = nll_loss(&z, &ld).unwrap();
        let t1 = t.elapsed().as_secs_f64();
        let g = loss.backward().unwrap();
        let t2 = t.elapsed().as_secs_f64();
        adam.step(&g).unwrap();
        let t3 = t.elapsed().as_secs_f64();
        println!("step {i}: fwd {t1:.2}s bwd {:.2}s adam {:.2}s -> {:.1} samples/s", t2 - t1, t3 - t2, 96.0 / t3);
    }
    println!("params {}", flow.parameter_count());
}
