//! Backbones and preprocessing against PyTorch/Pillow reference tensors (fixtures 1-3, 6-8).

mod common;
use candle_core::{Device, Tensor, Var};
use common::*;
use differnet::backbone::{self, multiscale_features, Backbone, BackboneKind, EfficientNetLite0};
use differnet::views::{normalize_lut, resize_bilinear, rotate_nearest, to_normalized_chw, Rgb8};

#[test]
fn formula_input_matches_recorded_hash() {
    use sha2::{Digest, Sha256};
    let x0 = formula_x0();
    let bytes: Vec<u8> = x0.iter().flat_map(|v| v.to_le_bytes()).collect();
    let hex: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "0db1287a6625762b7167e221d898eb973e4fa936eabdd0d40aed54a92c249c20");
}

#[test]
fn pth_zip_reader_matches_safetensors() {
    let st = fixture("alexnet_seed0_features.safetensors");
    let pth =
        differnet::backbone::weights::torch_file::read_state_dict(&shared().join("fixtures/alexnet_seed0_features_subset.pth")).unwrap();
    assert_eq!(pth.len(), 6);
    for (name, t) in pth {
        let want = vec_f32(&st[&name]);
        match t.data {
            differnet::backbone::weights::torch_file::TensorData::F32(v) => assert_eq!(v, want, "{name}"),
            _ => panic!("{name} is not f32"),
        }
        assert_eq!(t.shape, st[&name].dims());
    }
}

#[test]
fn alexnet_multiscale_features_and_input_gradient_match_pytorch() {
    let f = fixture("alexnet_multiscale.safetensors");
    let net = backbone::load(BackboneKind::Alexnet, &shared().join("fixtures/alexnet_seed0_features.safetensors"), &Device::Cpu).unwrap();
    let x = formula_batch();
    assert_eq!(vec_f32(&x.get(0).unwrap()), vec_f32(&f["x0"]));
    let xv = Var::from_tensor(&x).unwrap();
    let y = multiscale_features(net.as_ref(), &[0], xv.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[2, 768]);
    let err = max_abs_diff(&y, &f["y_f64"]);
    assert!(err < 1e-6, "features differ by {err}");
    // without gradient tracking the convolutions run in the Winograd domain (products on OpenBLAS when present)
    let fast = multiscale_features(net.as_ref(), &[0], &x).unwrap();
    let err = max_abs_diff(&fast, &f["y_f64"]);
    assert!(err < 1e-6, "Winograd features differ by {err} (sgemm: {:?})", differnet::kernels::sgemm::choice().classes);
    // gradient of L = sum(y^2) with respect to the 448 input
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let g = g.get(xv.as_tensor()).unwrap();
    let idx: Vec<u32> = (0..448).step_by(5).map(|i| i as u32).collect();
    let idx = Tensor::new(idx, &Device::Cpu).unwrap();
    let sub = g.index_select(&idx, 2).unwrap().index_select(&idx, 3).unwrap();
    let r = rel_l2(&vec_f32(&sub), &vec_f32(&f["grad_sub5"]));
    assert!(r < 1e-3, "gradient rel-L2 {r}");
    let crop = g.narrow(2, 208, 32).unwrap().narrow(3, 208, 32).unwrap();
    let r = rel_l2(&vec_f32(&crop), &vec_f32(&f["grad_crop_center32"]));
    assert!(r < 1e-3, "centre crop rel-L2 {r}");
    // per (sample, channel) sums of |g| against the f64 reference
    let stats = vec_f32(&f["grad_stats_f64ref"]);
    for s in 0..2 {
        for c in 0..3 {
            let plane = vec_f32(&g.get(s).unwrap().get(c).unwrap());
            let abs_sum: f64 = plane.iter().map(|v| v.abs() as f64).sum();
            let want = stats[(s * 3 + c) * 4 + 1] as f64;
            assert!((abs_sum - want).abs() / want < 1e-3, "sum|g| {s},{c}: {abs_sum} vs {want}");
        }
    }
}

fn efficientnet() -> EfficientNetLite0 {
    let p = shared().join("fixtures/efficientnet_lite0.safetensors");
    let t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    EfficientNetLite0::new(&t, &p).unwrap()
}

#[test]
fn efficientnet_pooled_features_and_logits_match_pytorch_at_all_scales() {
    let f = fixture("efficientnet_lite0_outputs.safetensors");
    let net = efficientnet();
    let x = formula_batch();
    for (name, factor) in [("x448", 1), ("x224", 2), ("x112", 4)] {
        let xs = backbone::downsample_nearest(&x, factor).unwrap();
        let maps = net.last_stage_map(&xs).unwrap();
        let shape: Vec<i64> = f[&format!("{name}.last_stage_shape")].to_vec1().unwrap();
        assert_eq!(maps.dims().iter().map(|&d| d as i64).collect::<Vec<_>>(), shape, "{name}");
        let pooled = maps.mean((2, 3)).unwrap();
        let err = max_abs_diff(&pooled, &f[&format!("{name}.pool320")]);
        assert!(err < 5e-5, "{name} pool320 differs by {err}");
        let logits = net.logits(&xs).unwrap();
        let err = max_abs_diff(&logits, &f[&format!("{name}.logits_f64")]);
        assert!(err < 1e-4, "{name} logits differ by {err}");
    }
}

#[test]
fn efficientnet_every_stage_output_matches_pytorch() {
    let f = fixture("efficientnet_lite0_outputs.safetensors");
    let net = efficientnet();
    let x = formula_batch();
    // the last block of each of the 7 stages (blocks 0, 1-2, 3-4, 5-7, 8-10, 11-14, 15)
    let last_block = [0, 2, 4, 7, 10, 14, 15];
    for (name, factor) in [("x224", 2), ("x112", 4)] {
        let xs = backbone::downsample_nearest(&x, factor).unwrap();
        let maps = net.stage_maps(&xs, &[0, 1, 2, 3, 4, 5, 6]).unwrap();
        for (stage, (map, block)) in maps.iter().zip(last_block).enumerate() {
            let err = max_abs_diff(&map.mean((2, 3)).unwrap(), &f[&format!("{name}.debug_pool_after_block{block}")]);
            assert!(err < 5e-5, "{name} stage {stage} differs by {err}");
        }
        // asking for a subset returns those stages only, in order, equal to the full run's
        let some = net.stage_maps(&xs, &[3, 5]).unwrap();
        assert_eq!(vec_f32(&some[0]), vec_f32(&maps[3]));
        assert_eq!(vec_f32(&some[1]), vec_f32(&maps[5]));
    }
    assert!(net.stage_maps(&x, &[7]).is_err());
}

#[test]
fn efficientnet_recognises_the_cat() {
    let f = fixture("efficientnet_lite0_outputs.safetensors");
    let net = efficientnet();
    let lut = normalize_lut();
    let mut batch = vec![];
    for key in ["astronaut_224_u8", "chelsea_224_u8"] {
        let hwc: Vec<u8> = f[key].flatten_all().unwrap().to_vec1().unwrap();
        let img = Rgb8 { width: 224, height: 224, data: hwc };
        batch.push(Tensor::from_vec(to_normalized_chw(&img, &lut), (1, 3, 224, 224), &Device::Cpu).unwrap());
    }
    let x = Tensor::cat(&batch, 0).unwrap();
    let logits = net.logits(&x).unwrap();
    assert!(max_abs_diff(&logits, &f["nat224.logits_f64"]) < 1e-4);
    let chelsea = vec_f32(&logits.get(1).unwrap());
    let top = (0..1000).max_by(|&a, &b| chelsea[a].partial_cmp(&chelsea[b]).unwrap()).unwrap();
    assert_eq!(top, 285, "Egyptian cat is ImageNet class 285");
}

#[test]
fn preprocessing_is_pillow_exact() {
    let f = fixture("preprocess_mtd_exp0_num_743.safetensors");
    let decoded: Vec<u8> = f["decoded_u8"].flatten_all().unwrap().to_vec1().unwrap();
    let src = Rgb8::from_gray(240, 289, &decoded);
    let resized = resize_bilinear(&src, 448, 448);
    let want: Vec<u8> = f["resized_u8"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(resized.channel(0), want, "resize");
    for (deg, key) in [(90.0, "rot90_u8"), (37.0, "rot37_u8")] {
        let want: Vec<u8> = f[key].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rotate_nearest(&resized, deg).channel(0), want, "rotate {deg}");
    }
    let lut = normalize_lut();
    let table = vec_f32(&f["normalize_lut"]);
    assert_eq!(lut.iter().flatten().copied().collect::<Vec<f32>>(), table);
    for (deg, name) in [(0.0, "rot0"), (90.0, "rot90"), (37.0, "rot37")] {
        let t = to_normalized_chw(&rotate_nearest(&resized, deg), &lut);
        let crop: Vec<f32> = (0..3)
            .flat_map(|c| (200..232).flat_map(move |i| (200..232).map(move |j| (c, i, j))))
            .map(|(c, i, j)| t[c * 448 * 448 + i * 448 + j])
            .collect();
        assert_eq!(crop, vec_f32(&f[&format!("t_{name}_crop_c_r200_232_c200_232")]), "{name} crop");
        let sum: f64 = t.iter().map(|&v| v as f64).sum();
        let want = f[&format!("t_{name}_sum_f64")].to_scalar::<f64>().unwrap();
        assert!((sum - want).abs() < 1e-6 * want.abs().max(1.0), "{name} sum {sum} vs {want}");
    }
}

#[test]
fn jpeg_decoder_is_close_to_libjpeg_turbo() {
    let f = fixture("preprocess_mtd_exp0_num_743.safetensors");
    let want: Vec<u8> = f["decoded_u8"].flatten_all().unwrap().to_vec1().unwrap();
    let img = differnet::views::load_rgb(&shared().join("data/mtd/test/good/exp0_num_743.jpg")).unwrap();
    assert_eq!((img.width, img.height), (240, 289));
    let got = img.channel(0);
    let max = got.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    // different IDCTs may differ by a grey level in a few pixels, never more
    assert!(max <= 1, "max difference {max} grey levels, {off} pixels differ");
    eprintln!("jpeg: {off} of {} pixels differ by one grey level", want.len());
}
