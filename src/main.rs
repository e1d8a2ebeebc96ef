//! `differnet`: the command line. A thin layer over the library (see `cli/`): parse, set up
//! logging, run the subcommand, report errors.

mod cli;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    // freed layer outputs are reused from the heap instead of being mapped and zeroed anew
    differnet::keep_freed_buffers();
    let level = if cli.quiet { "error" } else { ["warn", "info", "debug"][cli.verbose.min(2) as usize] };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .init();
    // OpenBLAS (when installed) is loaded now, while this is the only thread: it reads its
    // environment when loaded, and `sgemm` may set OPENBLAS_CORETYPE first; then the faster
    // backend per product shape is read from this machine's cache, or measured (~0.3 s) and cached
    differnet::kernels::sgemm::init(Some(&differnet::backbone::weights::home().join("sgemm-choice.json")));
    if let Err(e) = cli::run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
