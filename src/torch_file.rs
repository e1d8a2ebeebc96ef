//! Reader for PyTorch `torch.save` state dicts, both the zip format and the legacy (pre-1.6)
//! stream format, with a small pickle interpreter; no PyTorch is needed at run time.

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

#[derive(Debug, Clone)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    /// Integers wider than 64 bits (the legacy format's magic number).
    BigInt(i128),
    Float,
    Str(String),
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Global(String, String),
    /// A persistent storage reference: (key, dtype name).
    Storage(String, String),
    Tensor { key: String, dtype: String, offset: usize, size: Vec<usize>, stride: Vec<usize> },
    /// Any other object built by REDUCE/NEWOBJ; kept opaque.
    Object,
    Mark,
}

const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

struct Pickle<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Pickle<'a> {
    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("pickle at byte {}: {reason}", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos + n > self.data.len() {
            return Err(self.err("unexpected end of file"));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }

    /// Runs one pickle to its STOP opcode and returns the resulting object.
    fn run(&mut self) -> Result<Val> {
        let mut stack: Vec<Val> = Vec::new();
        let mut memo: HashMap<u32, Val> = HashMap::new();
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return stack.pop().ok_or_else(|| self.err("empty stack at STOP")),
                b'}' => stack.push(Val::Dict(vec![])),
                b']' => stack.push(Val::List(vec![])),
                b')' => stack.push(Val::Tuple(vec![])),
                b'(' => stack.push(Val::Mark),
                b'N' => stack.push(Val::None),
                0x88 => stack.push(Val::Bool(true)),
                0x89 => stack.push(Val::Bool(false)),
                b'J' => stack.push(Val::Int(self.u32()? as i32 as i64)),
                b'K' => stack.push(Val::Int(self.u8()? as i64)),
                b'M' => {
                    let b = self.take(2)?;
                    stack.push(Val::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let mut v: i128 = 0;
                    for (i, &x) in b.iter().enumerate().take(16) {
                        v |= (x as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    stack.push(match i64::try_from(v) {
                        Ok(i) => Val::Int(i),
                        Err(_) => Val::BigInt(v),
                    })
                }
                b'G' => {
                    self.take(8)?;
                    stack.push(Val::Float)
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    stack.push(Val::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    stack.push(Val::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    stack.push(Val::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    stack.push(Val::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    self.take(n)?;
                    stack.push(Val::Object)
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    memo.insert(k, stack.last().cloned().ok_or_else(|| self.err("BINPUT on empty stack"))?);
                }
                b'r' => {
                    let k = self.u32()?;
                    memo.insert(k, stack.last().cloned().ok_or_else(|| self.err("LONG_BINPUT on empty stack"))?);
                }
                0x94 => {
                    let k = memo.len() as u32;
                    memo.insert(k, stack.last().cloned().ok_or_else(|| self.err("MEMOIZE on empty stack"))?);
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    stack.push(memo.get(&k).cloned().ok_or_else(|| self.err(format!("memo {k} missing")))?)
                }
                b'j' => {
                    let k = self.u32()?;
                    stack.push(memo.get(&k).cloned().ok_or_else(|| self.err(format!("memo {k} missing")))?)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    stack.push(Val::Global(module, name))
                }
                0x93 => {
                    let name = self.pop(&mut stack)?;
                    let module = self.pop(&mut stack)?;
                    match (module, name) {
                        (Val::Str(m), Val::Str(n)) => stack.push(Val::Global(m, n)),
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b't' => {
                    let items = self.pop_mark(&mut stack)?;
                    stack.push(Val::Tuple(items))
                }
                0x85 => {
                    let a = self.pop(&mut stack)?;
                    stack.push(Val::Tuple(vec![a]))
                }
                0x86 => {
                    let b = self.pop(&mut stack)?;
                    let a = self.pop(&mut stack)?;
                    stack.push(Val::Tuple(vec![a, b]))
                }
                0x87 => {
                    let c = self.pop(&mut stack)?;
                    let b = self.pop(&mut stack)?;
                    let a = self.pop(&mut stack)?;
                    stack.push(Val::Tuple(vec![a, b, c]))
                }
                b'l' => {
                    let items = self.pop_mark(&mut stack)?;
                    stack.push(Val::List(items))
                }
                b'a' => {
                    let v = self.pop(&mut stack)?;
                    if let Some(Val::List(l)) = stack.last_mut() {
                        l.push(v)
                    }
                }
                b'e' => {
                    let items = self.pop_mark(&mut stack)?;
                    if let Some(Val::List(l)) = stack.last_mut() {
                        l.extend(items)
                    }
                }
                b's' => {
                    let v = self.pop(&mut stack)?;
                    let k = self.pop(&mut stack)?;
                    if let Some(Val::Dict(d)) = stack.last_mut() {
                        d.push((k, v))
                    }
                }
                b'u' => {
                    let items = self.pop_mark(&mut stack)?;
                    if let Some(Val::Dict(d)) = stack.last_mut() {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v))
                        }
                    }
                }
                b'b' => {
                    // BUILD: set state on an object; state dicts ignore it (`_metadata`).
                    self.pop(&mut stack)?;
                }
                b'Q' => {
                    let pid = self.pop(&mut stack)?;
                    stack.push(self.persistent(pid)?)
                }
                b'R' | 0x81 => {
                    let args = self.pop(&mut stack)?;
                    let callable = self.pop(&mut stack)?;
                    stack.push(self.reduce(callable, args)?)
                }
                _ => return Err(self.err(format!("unsupported pickle opcode 0x{op:02x}"))),
            }
        }
    }

    fn pop(&self, stack: &mut Vec<Val>) -> Result<Val> {
        stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn pop_mark(&self, stack: &mut Vec<Val>) -> Result<Vec<Val>> {
        let at = stack.iter().rposition(|v| matches!(v, Val::Mark)).ok_or_else(|| self.err("no MARK"))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    fn persistent(&self, pid: Val) -> Result<Val> {
        // ('storage', torch.XStorage, key, location, numel[, view_metadata])
        if let Val::Tuple(t) = pid {
            if let (Some(Val::Global(_, dtype)), Some(Val::Str(key))) = (t.get(1), t.get(2)) {
                return Ok(Val::Storage(key.clone(), dtype.clone()));
            }
        }
        Err(self.err("unsupported persistent id (expected a torch storage)"))
    }
    fn reduce(&self, callable: Val, args: Val) -> Result<Val> {
        match (&callable, args) {
            (Val::Global(m, n), _) if m == "collections" && n == "OrderedDict" => Ok(Val::Dict(vec![])),
            (Val::Global(m, n), Val::Tuple(a)) if m == "torch._utils" && n == "_rebuild_tensor_v2" => {
                let (key, dtype) = match a.first() {
                    Some(Val::Storage(k, d)) => (k.clone(), d.clone()),
                    _ => return Err(self.err("_rebuild_tensor_v2 without a storage")),
                };
                let offset = int(a.get(1)).ok_or_else(|| self.err("tensor offset"))? as usize;
                let size = ints(a.get(2)).ok_or_else(|| self.err("tensor size"))?;
                let stride = ints(a.get(3)).ok_or_else(|| self.err("tensor stride"))?;
                Ok(Val::Tensor { key, dtype, offset, size, stride })
            }
            _ => Ok(Val::Object),
        }
    }
}

fn int(v: Option<&Val>) -> Option<i64> {
    match v {
        Some(Val::Int(i)) => Some(*i),
        Some(Val::Bool(b)) => Some(*b as i64),
        _ => None,
    }
}
fn ints(v: Option<&Val>) -> Option<Vec<usize>> {
    match v {
        Some(Val::Tuple(t)) | Some(Val::List(t)) => t.iter().map(|x| int(Some(x)).map(|i| i as usize)).collect(),
        _ => None,
    }
}

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
    let n: usize = size.iter().product();
    let mut idx = Vec::with_capacity(n);
    if n > 0 {
        let mut pos = vec![0usize; size.len()];
        for _ in 0..n {
            let lin = offset + pos.iter().zip(stride).map(|(p, s)| p * s).sum::<usize>();
            if lin >= numel_storage {
                return Err(Error::format(path, format!("{name}: tensor view exceeds its storage")));
            }
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
        "BFloat16Storage" => TensorData::F32(idx.iter().map(|&i| f32::from_bits((u16::from_le_bytes(at(i).try_into().unwrap()) as u32) << 16)).collect()),
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
        if man == 0 { f32::INFINITY } else { f32::NAN }
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
    if bytes.starts_with(b"PK") {
        read_zip(path, &bytes)
    } else {
        read_legacy(path, &bytes)
    }
}

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<Vec<(String, RawTensor)>> {
    let mut p = Pickle { data: bytes, pos: 0, path };
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
    let pkl = names.iter().find(|n| n.ends_with("/data.pkl") || *n == "data.pkl").cloned()
        .ok_or_else(|| Error::format(path, "zip has no data.pkl: not a torch.save file"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let read = |archive: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str| -> Result<Vec<u8>> {
        let mut f = archive.by_name(name).map_err(zerr)?;
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(|e| Error::io(path, e))?;
        Ok(v)
    };
    let pkl_bytes = read(&mut archive, &pkl)?;
    let root = Pickle { data: &pkl_bytes, pos: 0, path }.run()?;
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
