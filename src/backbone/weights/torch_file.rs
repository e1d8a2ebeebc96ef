//! Reader for PyTorch `torch.save` state dicts, both the zip format and the legacy (pre-1.6)
//! stream format, through the restricted pickle interpreter; no PyTorch is needed at run time.

use crate::backbone::weights::pickle::{Flavor, Pickle, Val};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// A tensor read from a torch file: dtype-erased f32 values (integer tensors are converted) and shape.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

#[derive(Debug, Clone)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Largest zip member read (a VGG16 state dict is about 530 MB).
const MAX_MEMBER_BYTES: u64 = 4 << 30;

const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "FloatStorage" | "IntStorage" => 4,
        "DoubleStorage" | "LongStorage" => 8,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "ByteStorage" | "CharStorage" | "BoolStorage" => 1,
        _ => return None,
    })
}

/// Converts the raw little-endian bytes of a storage to a tensor honouring offset and strides.
fn materialize(path: &Path, name: &str, dtype: &str, bytes: &[u8], offset: usize, size: &[usize], stride: &[usize]) -> Result<RawTensor> {
    let es = dtype_size(dtype).ok_or_else(|| Error::format(path, format!("{name}: unsupported storage type {dtype}")))?;
    let numel_storage = bytes.len() / es;
    if stride.len() != size.len() {
        return Err(Error::format(path, format!("{name}: {} sizes but {} strides", size.len(), stride.len())));
    }
    // the element count a file claims is checked against the bytes it holds before allocating:
    // a state dict's tensor never has more elements than its storage
    let n = size
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= numel_storage)
        .ok_or_else(|| Error::format(path, format!("{name}: shape {size:?} holds more elements than its storage's {numel_storage}")))?;
    let mut idx = Vec::with_capacity(n);
    if n > 0 {
        let mut pos = vec![0usize; size.len()];
        for _ in 0..n {
            let lin = pos
                .iter()
                .zip(stride)
                .try_fold(offset, |acc, (p, s)| p.checked_mul(*s).and_then(|v| acc.checked_add(v)))
                .filter(|&lin| lin < numel_storage)
                .ok_or_else(|| Error::format(path, format!("{name}: tensor view exceeds its storage")))?;
            idx.push(lin);
            for d in (0..size.len()).rev() {
                pos[d] += 1;
                if pos[d] < size[d] {
                    break;
                }
                pos[d] = 0;
            }
        }
    }
    let at = |i: usize| &bytes[i * es..(i + 1) * es];
    let data = match dtype {
        "FloatStorage" => TensorData::F32(idx.iter().map(|&i| f32::from_le_bytes(at(i).try_into().unwrap())).collect()),
        "DoubleStorage" => TensorData::F32(idx.iter().map(|&i| f64::from_le_bytes(at(i).try_into().unwrap()) as f32).collect()),
        "HalfStorage" => TensorData::F32(idx.iter().map(|&i| half_to_f32(u16::from_le_bytes(at(i).try_into().unwrap()))).collect()),
        "BFloat16Storage" => {
            TensorData::F32(idx.iter().map(|&i| f32::from_bits((u16::from_le_bytes(at(i).try_into().unwrap()) as u32) << 16)).collect())
        }
        "LongStorage" => TensorData::I64(idx.iter().map(|&i| i64::from_le_bytes(at(i).try_into().unwrap())).collect()),
        "IntStorage" => TensorData::I64(idx.iter().map(|&i| i32::from_le_bytes(at(i).try_into().unwrap()) as i64).collect()),
        "ShortStorage" => TensorData::I64(idx.iter().map(|&i| i16::from_le_bytes(at(i).try_into().unwrap()) as i64).collect()),
        "ByteStorage" | "BoolStorage" => TensorData::I64(idx.iter().map(|&i| at(i)[0] as i64).collect()),
        "CharStorage" => TensorData::I64(idx.iter().map(|&i| at(i)[0] as i8 as i64).collect()),
        _ => unreachable!(),
    };
    Ok(RawTensor { shape: size.to_vec(), data })
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as u32;
    let v = if exp == 0 {
        (man as f32) * 2f32.powi(-24)
    } else if exp == 31 {
        if man == 0 {
            f32::INFINITY
        } else {
            f32::NAN
        }
    } else {
        f32::from_bits(((exp - 15 + 127) as u32) << 23 | man << 13)
    };
    f32::from_bits(v.to_bits() | sign)
}

/// One tensor of a state dict: (name, storage key, storage dtype, offset, size, stride).
type StateDictEntry = (String, String, String, usize, Vec<usize>, Vec<usize>);

fn state_dict_entries(path: &Path, root: Val) -> Result<Vec<StateDictEntry>> {
    let dict = match root {
        Val::Dict(d) => d,
        _ => return Err(Error::format(path, "top-level object is not a state dict")),
    };
    let mut out = vec![];
    for (k, v) in dict {
        if let (Val::Str(name), Val::Tensor { key, dtype, offset, size, stride }) = (k, v) {
            out.push((name, key, dtype, offset, size, stride));
        }
    }
    if out.is_empty() {
        return Err(Error::format(path, "state dict holds no tensors"));
    }
    Ok(out)
}

/// Reads a `torch.save` state dict (zip or legacy format) into named tensors, in file order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_state_dict_bytes(&bytes, path)
}

/// [`read_state_dict`] on the bytes of a file (`path` names it in errors).
pub fn read_state_dict_bytes(bytes: &[u8], path: &Path) -> Result<Vec<(String, RawTensor)>> {
    if bytes.starts_with(b"PK") {
        read_zip(path, bytes)
    } else {
        read_legacy(path, bytes)
    }
}

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<Vec<(String, RawTensor)>> {
    let mut p = Pickle::new(bytes, path, Flavor::Torch);
    match p.run()? {
        Val::BigInt(m) if m as u128 == LEGACY_MAGIC => {}
        _ => return Err(Error::format(path, "not a PyTorch file (no zip header, no legacy magic number)")),
    }
    match p.run()? {
        Val::Int(1001) => {}
        other => return Err(Error::format(path, format!("unsupported legacy protocol version {other:?}"))),
    }
    p.run()?; // sys info
    let entries = state_dict_entries(path, p.run()?)?;
    let keys = match p.run()? {
        Val::List(k) => k,
        _ => return Err(Error::format(path, "missing storage key list")),
    };
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    let dtypes: HashMap<&str, &str> = entries.iter().map(|e| (e.1.as_str(), e.2.as_str())).collect();
    for k in keys {
        let Val::Str(k) = k else { return Err(Error::format(path, "bad storage key")) };
        let numel = u64::from_le_bytes(p.take(8)?.try_into().unwrap()) as usize;
        let es = dtypes.get(k.as_str()).and_then(|d| dtype_size(d)).unwrap_or(4);
        let data = p.take(numel.checked_mul(es).ok_or_else(|| Error::format(path, "storage size overflow"))?)?;
        storages.insert(k, data);
    }
    entries
        .into_iter()
        .map(|(name, key, dtype, offset, size, stride)| {
            let data = storages.get(&key).ok_or_else(|| Error::format(path, format!("{name}: storage {key} missing")))?;
            Ok((name.clone(), materialize(path, &name, &dtype, data, offset, &size, &stride)?))
        })
        .collect()
}

fn read_zip(path: &Path, bytes: &[u8]) -> Result<Vec<(String, RawTensor)>> {
    let zerr = |e: zip::result::ZipError| Error::format(path, format!("zip: {e}"));
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(zerr)?;
    let names: Vec<String> = archive.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .cloned()
        .ok_or_else(|| Error::format(path, "zip has no data.pkl: not a torch.save file"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let read = |archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str| -> Result<Vec<u8>> {
        let f = archive.by_name(name).map_err(zerr)?;
        // a member may not claim (or inflate to) more than a weight file can hold
        if f.size() > MAX_MEMBER_BYTES {
            return Err(Error::format(path, format!("zip member {name} claims {} bytes, more than {MAX_MEMBER_BYTES}", f.size())));
        }
        let declared = f.size();
        let mut v = Vec::new();
        f.take(declared + 1).read_to_end(&mut v).map_err(|e| Error::io(path, e))?;
        if v.len() as u64 != declared {
            return Err(Error::format(path, format!("zip member {name} holds {} bytes where it claims {declared}", v.len())));
        }
        Ok(v)
    };
    let pkl_bytes = read(&mut archive, &pkl)?;
    let root = Pickle::new(&pkl_bytes, path, Flavor::Torch).run()?;
    let entries = state_dict_entries(path, root)?;
    let mut out = vec![];
    let mut cache: HashMap<String, Vec<u8>> = HashMap::new();
    for (name, key, dtype, offset, size, stride) in entries {
        if !cache.contains_key(&key) {
            let data = read(&mut archive, &format!("{prefix}data/{key}"))?;
            cache.insert(key.clone(), data);
        }
        out.push((name.clone(), materialize(path, &name, &dtype, &cache[&key], offset, &size, &stride)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STORAGE: [u8; 16] = [0; 16]; // four f32 zeros

    fn view(size: &[usize], stride: &[usize], offset: usize) -> Result<RawTensor> {
        materialize(Path::new("w.pth"), "w", "FloatStorage", &STORAGE, offset, size, stride)
    }

    #[test]
    fn a_shape_larger_than_its_storage_is_refused_before_allocating() {
        // 2^40 elements would need 8 TiB of indices: refused from the storage's length alone
        let e = view(&[1 << 40], &[1], 0).unwrap_err().to_string();
        assert!(e.contains("more elements than its storage's 4"), "{e}");
        // a product that overflows usize is refused the same way
        let e = view(&[usize::MAX / 2, 4], &[4, 1], 0).unwrap_err().to_string();
        assert!(e.contains("more elements"), "{e}");
    }

    #[test]
    fn views_outside_their_storage_are_refused() {
        assert!(view(&[2, 2], &[2, 1], 0).is_ok());
        assert!(view(&[2, 2], &[2, 1], 1).unwrap_err().to_string().contains("exceeds its storage"));
        // a stride whose product with a position overflows usize
        assert!(view(&[2], &[usize::MAX], 0).unwrap_err().to_string().contains("exceeds its storage"));
        assert!(view(&[2, 2], &[1], 0).unwrap_err().to_string().contains("2 sizes but 1 strides"));
    }
}
