//! The flow against PyTorch reference tensors (fixtures 4, 5) and against independent checks:
//! inverse round trip, finite-difference Jacobian log-determinant, closed-form Adam step.

mod common;
use candle_core::{Device, Tensor};
use common::*;
use differnet::flow::adam::{Adam, AdamConfig};
use differnet::flow::{nll_loss, FlowConfig, NormalizingFlow};
use std::collections::HashMap;

fn fixture_flow() -> (NormalizingFlow, HashMap<String, Tensor>) {
    let f = fixture("flow_w64.safetensors");
    let params: HashMap<String, Tensor> =
        f.iter().filter_map(|(k, v)| k.strip_prefix("params.").map(|n| (n.to_string(), v.clone()))).collect();
    assert_eq!(params.len(), 128);
    let config = FlowConfig { dim: 768, blocks: 8, hidden: 64, alpha: 3.0 };
    let flow = NormalizingFlow::from_parameters(config, &params, std::path::Path::new("flow_w64.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(flow.named_parameters().len(), 128, "every parameter from the file");
    (flow, f)
}

#[test]
fn permutations_are_the_official_numpy_ones() {
    for name in ["flow_w64.safetensors", "flow_w2048_outputs.safetensors"] {
        let f = fixture(name);
        for k in 0..8 {
            let want: Vec<i64> = f[&format!("perm.{k}")].to_vec1().unwrap();
            let got: Vec<i64> = differnet::flow::block_permutation(768, k).iter().map(|&v| v as i64).collect();
            assert_eq!(got, want, "{name} block {k}");
        }
    }
}

#[test]
fn forward_logdet_loss_and_blocks_match_pytorch() {
    let (flow, f) = fixture_flow();
    let x = &f["x"];
    let (z, logdet) = flow.forward(x).unwrap();
    assert!(max_abs_diff(&z, &f["z_f64"]) < 1e-5, "z: {}", max_abs_diff(&z, &f["z_f64"]));
    assert!(max_abs_diff(&logdet, &f["logdet_f64"]) < 1e-5, "logdet: {}", max_abs_diff(&logdet, &f["logdet_f64"]));
    let loss = nll_loss(&z, &logdet).unwrap();
    assert!(max_abs_diff(&loss, &f["loss_f64"]) < 1e-6);
    // frozen parameters (scoring): the subnets' products run on sgemm outside the graph
    let (zf, logdet_f) = flow.forward_frozen(x).unwrap();
    assert!(!zf.track_op(), "a frozen forward of a plain input builds no graph");
    assert!(max_abs_diff(&zf, &f["z_f64"]) < 1e-5, "frozen z: {}", max_abs_diff(&zf, &f["z_f64"]));
    assert!(max_abs_diff(&logdet_f, &f["logdet_f64"]) < 1e-5, "frozen logdet: {}", max_abs_diff(&logdet_f, &f["logdet_f64"]));
    // block by block
    let mut h = x.clone();
    for (k, b) in flow.blocks.iter().enumerate() {
        let (out, ld) = b.forward(&h, 3.0, false).unwrap();
        assert!(max_abs_diff(&out, &f[&format!("block_out.{k}")]) < 1e-5, "block {k}");
        assert!(max_abs_diff(&ld, &f[&format!("block_logdet.{k}")]) < 1e-5, "block {k} logdet");
        h = out;
    }
}

#[test]
fn inverse_round_trip_is_exact() {
    let (flow, f) = fixture_flow();
    let (z, _) = flow.forward(&f["x"]).unwrap();
    let x_rec = flow.inverse(&z).unwrap();
    let err = max_abs_diff(&x_rec, &f["x"]);
    assert!(err < 1e-4, "round trip error {err}");
    assert!(max_abs_diff(&x_rec, &f["x_rec"]) < 1e-4);
    // a freshly initialised flow at the paper's width too
    let flow = NormalizingFlow::new(FlowConfig { dim: 96, blocks: 8, hidden: 256, alpha: 3.0 }, 7, &Device::Cpu).unwrap();
    let y = Tensor::randn(0f32, 2.0, (5, 96), &Device::Cpu).unwrap();
    let (z, _) = flow.forward(&y).unwrap();
    assert!(max_abs_diff(&flow.inverse(&z).unwrap(), &y) < 1e-4);
}

#[test]
fn logdet_equals_finite_difference_jacobian() {
    // small flow, odd dimension: log|det J| from central differences in f64 arithmetic on f32 outputs
    let dim = 7;
    let flow = NormalizingFlow::new(FlowConfig { dim, blocks: 3, hidden: 16, alpha: 3.0 }, 3, &Device::Cpu).unwrap();
    let y0: Vec<f32> = (0..dim).map(|i| ((i as f32) * 0.7).sin()).collect();
    let (_, ld) = flow.forward(&Tensor::from_vec(y0.clone(), (1, dim), &Device::Cpu).unwrap()).unwrap();
    let ld = vec_f32(&ld)[0] as f64;
    let h = 1e-2f32;
    let mut jac = vec![vec![0f64; dim]; dim];
    for j in 0..dim {
        let mut rows = vec![];
        for s in [h, -h] {
            let mut y = y0.clone();
            y[j] += s;
            rows.push(vec_f32(&flow.forward(&Tensor::from_vec(y, (1, dim), &Device::Cpu).unwrap()).unwrap().0));
        }
        for i in 0..dim {
            jac[i][j] = (rows[0][i] as f64 - rows[1][i] as f64) / (2.0 * h as f64);
        }
    }
    // determinant by Gaussian elimination with partial pivoting
    let mut det_log = 0f64;
    let mut a = jac;
    for c in 0..dim {
        let p = (c..dim).max_by(|&x, &y| a[x][c].abs().partial_cmp(&a[y][c].abs()).unwrap()).unwrap();
        a.swap(c, p);
        det_log += a[c][c].abs().ln();
        let pivot = a[c].clone();
        for row in a.iter_mut().skip(c + 1) {
            let f = row[c] / pivot[c];
            row.iter_mut().zip(&pivot).skip(c).for_each(|(x, p)| *x -= f * p);
        }
    }
    assert!((det_log - ld).abs() < 2e-3, "finite-difference log|det| {det_log} vs flow {ld}");
}

#[test]
fn one_adam_step_matches_pytorch_and_closed_form() {
    let (flow, f) = fixture_flow();
    let (z, ld) = flow.forward(&f["x"]).unwrap();
    let loss = nll_loss(&z, &ld).unwrap();
    let grads = loss.backward().unwrap();
    // gradients against the stored ones (block 0)
    for (name, var) in flow.named_parameters() {
        if let Some(want) = f.get(&format!("grad.{name}")) {
            let got = grads.get(var.as_tensor()).unwrap();
            let scale = vec_f32(want).iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(max_abs_diff(got, want) <= 1e-5 * scale.max(1e-3), "grad {name}");
        }
    }
    // closed form of the first step: p - lr/(1-b1) * m / (sqrt(v)/sqrt(1-b2) + eps)
    let c = AdamConfig::default();
    let before: Vec<(String, Vec<f32>, Vec<f32>)> = flow
        .named_parameters()
        .iter()
        .map(|(n, v)| (n.clone(), vec_f32(v.as_tensor()), vec_f32(grads.get(v.as_tensor()).unwrap())))
        .collect();
    let mut adam = Adam::new(flow.named_parameters().into_iter().map(|(_, v)| v.clone()).collect(), c.clone());
    adam.step(&grads).unwrap();
    for ((name, var), (_, p0, g)) in flow.named_parameters().iter().zip(&before) {
        let got = vec_f32(var.as_tensor());
        for i in (0..got.len()).step_by(97) {
            let gp = g[i] as f64 + c.weight_decay * p0[i] as f64;
            let m = (1.0 - c.beta1) * gp;
            let v = (1.0 - c.beta2) * gp * gp;
            let want = p0[i] as f64 - c.lr / (1.0 - c.beta1) * m / (v.sqrt() / (1.0 - c.beta2).sqrt() + c.eps);
            assert!((got[i] as f64 - want).abs() < 1e-7, "{name}[{i}]");
        }
        if let Some(want) = f.get(&format!("after_adam_step.{name}")) {
            assert!(max_abs_diff(var.as_tensor(), want) < 1e-7, "after step {name}");
        }
    }
    let (z, ld) = flow.forward(&f["x"]).unwrap();
    let loss2 = nll_loss(&z, &ld).unwrap();
    assert!(max_abs_diff(&loss2, &f["loss_after_adam_step"]) < 1e-6);
}

#[test]
fn hand_written_gradients_equal_autograd_and_pytorch() {
    use differnet::flow::backward::FlowTrainer;
    let (flow, f) = fixture_flow();
    let x = &f["x"];
    let (z, ld) = flow.forward(x).unwrap();
    let loss = nll_loss(&z, &ld).unwrap();
    let grads = loss.backward().unwrap();
    let mut fast = FlowTrainer::from_flow(&flow).unwrap();
    let fast_loss = fast.loss_and_gradients(&vec_f32(x), 8);
    assert!((fast_loss - vec_f32(&f["loss_f64"])[0] as f64).abs() < 1e-6, "loss {fast_loss}");
    let want_sumsq = vec_f32(&f["grad_sumsq_f64"]);
    for (i, ((name, var), g)) in flow.named_parameters().iter().zip(fast.gradients()).enumerate() {
        let auto = vec_f32(grads.get(var.as_tensor()).unwrap());
        let scale = auto.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = auto.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-4 * scale, "{name}: max diff {err} of scale {scale}");
        let sumsq: f64 = g.iter().map(|v| (*v as f64).powi(2)).sum();
        let want = want_sumsq[i] as f64;
        assert!((sumsq - want).abs() <= 1e-3 * want.max(1e-12), "{name}: sum g² {sumsq} vs PyTorch {want}");
    }
    // the Adam step on buffers gives PyTorch's updated parameters
    fast.adam_step(&AdamConfig::default());
    fast.write_to(&flow).unwrap();
    let (z, ld) = flow.forward(x).unwrap();
    let loss2 = nll_loss(&z, &ld).unwrap();
    assert!(max_abs_diff(&loss2, &f["loss_after_adam_step"]) < 1e-6);
}
