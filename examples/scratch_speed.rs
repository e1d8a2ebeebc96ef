use candle_core::Device;
use differnet::flow::{FlowConfig, NormalizingFlow};
use differnet::flow_grad::FlowTrainer;
use differnet::optim::AdamConfig;
fn main() {
    let flow = NormalizingFlow::new(FlowConfig::new(960), 0, &Device::Cpu).unwrap();
    let mut t = FlowTrainer::from_flow(&flow).unwrap();
    let y: Vec<f32> = (0..96 * 960).map(|i| ((i as f32) * 0.37).sin()).collect();
    for i in 0..4 {
        let s = std::time::Instant::now();
        let l = t.loss_and_gradients(&y, 96);
        let t1 = s.elapsed().as_secs_f64();
        t.adam_step(&AdamConfig::default());
        let t2 = s.elapsed().as_secs_f64();
        println!("step {i}: loss {l:.4} fwd+bwd {t1:.2}s adam {:.2}s -> {:.1} samples/s", t2 - t1, 96.0 / t2);
    }
}
