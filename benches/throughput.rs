//! `cargo bench`: the measurements of `differnet bench` (sgemm, backbone, flow training, test
//! latency, peak memory) for AlexNet (random weights) and, when installed, EfficientNet-Lite0.
//! Every rate is printed next to the same process's 2048³ sgemm, so runs on busy machines compare.

use candle_core::Device;
use differnet::backbone::BackboneKind;
use differnet::bench;
use differnet::flow::FlowConfig;

fn main() -> differnet::Result<()> {
    // `cargo bench -- --quick` (or `DIFFERNET_BENCH_QUICK=1`) for a short smoke run
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("DIFFERNET_BENCH_QUICK").is_some();
    let (views, flow_steps) = if quick { (4, 1) } else { (32, 5) };
    // as the binary does: freed layer outputs are reused from the heap
    differnet::keep_freed_buffers();
    println!("sgemm backends: {:?}", differnet::kernels::sgemm::choice().classes);
    for kind in [BackboneKind::EfficientnetLite0, BackboneKind::Alexnet] {
        let ex = match bench::extractor(kind, &Device::Cpu) {
            Ok(ex) => ex,
            Err(e) => {
                println!("\n{}: skipped ({e})", kind.id());
                continue;
            }
        };
        let flow = FlowConfig::new(ex.feature_dim());
        let report = bench::run(&ex, views, &flow, 96, flow_steps)?;
        println!("\n{}", kind.id());
        print!("{}", report.table());
    }
    Ok(())
}
