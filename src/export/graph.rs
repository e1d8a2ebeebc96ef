//! A small builder of ONNX graphs over the `onnx-protobuf` schema types: named nodes with
//! attributes, f32/i64 initializers, typed graph inputs and outputs, and the model around them.

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The ONNX operator set the graphs are written for.
pub const OPSET: i64 = 17;
/// ONNX IR version 8 (opsets up to 17 and later are read by every current runtime).
pub const IR_VERSION: i64 = 8;

/// One attribute value of a node.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(&'static str),
}

/// A dimension of a graph input or output: fixed, or named (symbolic, e.g. the batch).
pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

/// An ONNX graph being built: nodes in topological order, initializers, inputs and outputs.
#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    next: usize,
    /// Names of the initializers so far (one initializer can feed many nodes).
    initializers: std::collections::HashSet<String>,
}

impl GraphBuilder {
    /// A node `op` over `inputs` with `attrs`; returns the name of its (single) output.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        self.next += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.next);
        self.op_into(op, inputs, attrs, &out);
        out
    }

    /// A node `op` whose output gets the name `out` (graph outputs are named so).
    pub fn op_into(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], out: &str) {
        self.node(op, inputs, attrs, vec![out.to_string()]);
    }

    /// A node `op` with `outputs` outputs (TopK's values and indices); returns their names.
    pub fn op_outputs(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], outputs: usize) -> Vec<String> {
        self.next += 1;
        let names: Vec<String> = (0..outputs).map(|i| format!("{}_{}_{i}", op.to_lowercase(), self.next)).collect();
        self.node(op, inputs, attrs, names.clone());
        names
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: &[(&str, Attr)], outputs: Vec<String>) {
        let mut node = NodeProto::new();
        node.op_type = op.to_string();
        node.name = format!("{}_node", outputs[0]);
        node.input = inputs.iter().map(|s| s.to_string()).collect();
        node.output = outputs;
        node.attribute = attrs.iter().map(|(name, a)| attribute(name, a)).collect();
        self.graph.node.push(node);
    }

    /// An f32 initializer `name` of shape `dims` (row-major values); returns its name.
    /// A name given twice keeps the first initializer (the same weights at every scale).
    pub fn f32s(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        if !self.initializers.insert(name.to_string()) {
            return name.to_string();
        }
        assert_eq!(dims.iter().product::<usize>(), values.len(), "initializer {name}: shape and values disagree");
        let mut t = tensor(name, dims, DataType::FLOAT);
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph.initializer.push(t);
        name.to_string()
    }

    /// f32 values stored as an f16 initializer `name` and widened by a `Cast` node; returns the
    /// f32 tensor's name. For values that are f16 already (an f16 model's flow), exactly them.
    pub fn f16s_as_f32(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let stored = format!("{name}.f16");
        if self.initializers.insert(stored.clone()) {
            assert_eq!(dims.iter().product::<usize>(), values.len(), "initializer {name}: shape and values disagree");
            let mut t = tensor(&stored, dims, DataType::FLOAT16);
            t.raw_data = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
            self.graph.initializer.push(t);
            self.op_into("Cast", &[&stored], &[("to", Attr::Int(DataType::FLOAT as i64))], name);
        }
        name.to_string()
    }

    /// A one-element f32 constant (a 0-d initializer, broadcast by the arithmetic ops).
    pub fn scalar(&mut self, value: f32) -> String {
        self.next += 1;
        let name = format!("const_{}", self.next);
        self.f32s(&name, &[], &[value])
    }

    /// A one-element f64 constant (the decision is computed in f64, as the native one is).
    pub fn scalar_f64(&mut self, value: f64) -> String {
        self.next += 1;
        let name = format!("const_{}", self.next);
        let mut t = tensor(&name, &[], DataType::DOUBLE);
        t.raw_data = value.to_le_bytes().to_vec();
        self.initializers.insert(name.clone());
        self.graph.initializer.push(t);
        name
    }

    /// An i64 initializer of shape [len] (shapes, axes, indices, slice bounds).
    pub fn i64s(&mut self, values: &[i64]) -> String {
        self.next += 1;
        let name = format!("const_{}", self.next);
        self.named_i64s(&name, values);
        name
    }

    /// An i64 initializer with a given name (an input's default value).
    pub fn named_i64s(&mut self, name: &str, values: &[i64]) -> String {
        self.initializers.insert(name.to_string());
        let mut t = tensor(name, &[values.len()], DataType::INT64);
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.graph.initializer.push(t);
        name.to_string()
    }

    /// x[..., start:end] along `axis` with `step` (end i64::MAX: to the end).
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64, step: i64) -> String {
        let (s, e, a, st) = (self.i64s(&[start]), self.i64s(&[end]), self.i64s(&[axis]), self.i64s(&[step]));
        self.op("Slice", &[x, &s, &e, &a, &st], &[])
    }

    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) {
        self.graph.input.push(value_info(name, elem, dims));
    }

    /// A graph output with its description.
    pub fn output(&mut self, name: &str, elem: DataType, dims: &[Dim], doc: &str) {
        let mut v = value_info(name, elem, dims);
        v.doc_string = doc.to_string();
        self.graph.output.push(v);
    }

    /// The model: this graph, the operator set, the producer and the metadata properties.
    pub fn finish(mut self, name: &str, doc: &str, metadata: &[(String, String)]) -> ModelProto {
        self.graph.name = name.to_string();
        let mut m = ModelProto::new();
        m.ir_version = IR_VERSION;
        let mut opset = OperatorSetIdProto::new();
        opset.version = OPSET;
        m.opset_import = vec![opset];
        m.producer_name = "differnet".into();
        m.producer_version = env!("CARGO_PKG_VERSION").into();
        m.doc_string = doc.to_string();
        m.metadata_props = metadata
            .iter()
            .map(|(k, v)| {
                let mut e = StringStringEntryProto::new();
                e.key = k.clone();
                e.value = v.clone();
                e
            })
            .collect();
        m.graph = Some(self.graph).into();
        m
    }
}

fn tensor(name: &str, dims: &[usize], elem: DataType) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.dims = dims.iter().map(|&d| d as i64).collect();
    t.data_type = elem as i32;
    t
}

fn attribute(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto::new();
    p.name = name.to_string();
    let kind = match a {
        Attr::Int(v) => {
            p.i = *v;
            AttributeType::INT
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            AttributeType::INTS
        }
        Attr::Float(v) => {
            p.f = *v;
            AttributeType::FLOAT
        }
        Attr::Str(v) => {
            p.s = v.as_bytes().to_vec();
            AttributeType::STRING
        }
    };
    p.type_ = kind.into();
    p
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    shape.dim = dims
        .iter()
        .map(|d| {
            let mut dim = tensor_shape_proto::Dimension::new();
            match d {
                Dim::Fixed(v) => dim.set_dim_value(*v),
                Dim::Named(n) => dim.set_dim_param(n.to_string()),
            }
            dim
        })
        .collect();
    let mut t = type_proto::Tensor::new();
    t.elem_type = elem as i32;
    t.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.set_tensor_type(t);
    let mut v = ValueInfoProto::new();
    v.name = name.to_string();
    v.type_ = Some(ty).into();
    v
}
