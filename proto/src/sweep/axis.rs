//! Grid axes: checking an axis (its field path and values), grid values as plain JSON, setting a
//! value at a dotted lowerCamelCase path of a spec's JSON mapping, and the names derived from
//! values. Part of [`super`]'s validation; pure functions only.

use serde_json::{Map, Value};

use super::{
    arm_name_char, check_name, ENUM_PREFIXES, MAX_FIELD_CHARS, MAX_VALUES, MAX_VALUE_NAME_CHARS,
    RESERVED_FIELDS,
};
use crate::spec::FieldViolation;
use crate::v1;

/// Checks an axis field path: dot-separated lowerCamelCase names, not one the sweep sets.
pub(super) fn check_field(field: &str, path: &str) -> Result<Vec<String>, FieldViolation> {
    check_name(field, path, MAX_FIELD_CHARS)?;
    let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
    for p in &parts {
        let ok = p.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && p.chars().all(|c| c.is_ascii_alphanumeric());
        if !ok {
            return Err(FieldViolation::new(
                field,
                format!("{path:?} is not a dot-separated path of lowerCamelCase JobSpec field names (for example cifarCvae.init)"),
            ));
        }
    }
    for reserved in RESERVED_FIELDS {
        if path == reserved || path.starts_with(&format!("{reserved}.")) {
            return Err(FieldViolation::new(
                field,
                format!("{reserved} is set by the sweep and cannot be a grid axis"),
            ));
        }
    }
    Ok(parts)
}

/// The first NaN or infinity anywhere in `v` (JSON has no such numbers, and no spec field
/// accepts one).
pub(super) fn first_non_finite(v: &pbjson_types::Value) -> Option<f64> {
    use pbjson_types::value::Kind;
    match v.kind.as_ref()? {
        Kind::NumberValue(x) => (!x.is_finite()).then_some(*x),
        Kind::ListValue(l) => l.values.iter().find_map(first_non_finite),
        Kind::StructValue(s) => s.fields.values().find_map(first_non_finite),
        _ => None,
    }
}

/// A google.protobuf.Value as plain JSON, with whole numbers as integers (so a `uint32` field
/// accepts `32` given as the double 32.0).
pub(super) fn to_json(v: &pbjson_types::Value) -> Value {
    integral(serde_json::to_value(v).unwrap_or(Value::Null))
}

pub(super) fn integral(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                if f < 0.0 {
                    Value::from(f as i64)
                } else {
                    Value::from(f as u64)
                }
            }
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(integral).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, integral(v))).collect()),
        other => other,
    }
}

/// Sets `value` at `path` in a JSON object, creating the objects on the way.
pub(super) fn set_path(root: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("paths are not empty");
    let mut node = root;
    for p in parents {
        let obj = node
            .as_object_mut()
            .ok_or_else(|| format!("{p} is inside a value that is not an object"))?;
        node = obj
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    node.as_object_mut()
        .ok_or_else(|| format!("{last} is inside a value that is not an object"))?
        .insert(last.clone(), value);
    Ok(())
}

/// A short name for a value: strings lowercased without their enum prefix, numbers as text,
/// objects as their key words (`transfer.conv1=luminance+copyConv2`), restricted to
/// `[A-Za-z0-9_.+=-]` and 64 characters.
pub fn derive_name(v: &Value) -> String {
    let raw = render(v);
    let name: String = raw
        .chars()
        .map(|c| if arm_name_char(c) { c } else { '_' })
        .take(MAX_VALUE_NAME_CHARS)
        .collect();
    if name.is_empty() {
        "default".into()
    } else {
        name
    }
}

pub(super) fn render(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let s = ENUM_PREFIXES
                .iter()
                .find_map(|p| s.strip_prefix(p))
                .unwrap_or(s);
            s.to_lowercase()
        }
        Value::Array(a) => a.iter().map(render).collect::<Vec<_>>().join("+"),
        Value::Object(o) => {
            let words: Vec<String> = o
                .iter()
                .filter_map(|(k, v)| match v {
                    Value::Bool(true) => Some(k.clone()),
                    Value::Object(inner) if inner.is_empty() => Some(k.clone()),
                    Value::Bool(false) | Value::Null => None,
                    Value::Object(_) => Some(format!("{k}.{}", render(v))),
                    other => Some(format!("{k}={}", render(other))),
                })
                .collect();
            if words.is_empty() {
                "default".into()
            } else {
                words.join("+")
            }
        }
    }
}

/// One axis after its own checks: the path and, per value, the JSON and the name.
pub(super) struct Axis {
    pub(super) path: Vec<String>,
    pub(super) values: Vec<Value>,
    pub(super) names: Vec<String>,
}

pub(super) fn parse_axis(i: usize, axis: &v1::GridAxis) -> Result<Axis, FieldViolation> {
    let f = format!("spec.grid[{i}]");
    let path = check_field(&format!("{f}.field"), &axis.field)?;
    if axis.values.is_empty() || axis.values.len() > MAX_VALUES {
        return Err(FieldViolation::new(
            format!("{f}.values"),
            format!(
                "must have 1..={MAX_VALUES} values, got {}",
                axis.values.len()
            ),
        ));
    }
    for (j, v) in axis.values.iter().enumerate() {
        if let Some(x) = first_non_finite(v) {
            return Err(FieldViolation::new(
                format!("{f}.values[{j}]"),
                format!("must hold finite numbers only, got {x}"),
            ));
        }
    }
    let values: Vec<Value> = axis.values.iter().map(to_json).collect();
    for (j, v) in values.iter().enumerate() {
        if let Some(k) = values[..j].iter().position(|w| w == v) {
            return Err(FieldViolation::new(
                format!("{f}.values[{j}]"),
                format!("repeats spec.grid[{i}].values[{k}]"),
            ));
        }
    }
    let names = if axis.names.is_empty() {
        let mut names: Vec<String> = Vec::with_capacity(values.len());
        for v in &values {
            let base = derive_name(v);
            let mut name = base.clone();
            let mut k = 2;
            while names.contains(&name) {
                name = format!("{base}-{k}");
                k += 1;
            }
            names.push(name);
        }
        names
    } else {
        if axis.names.len() != values.len() {
            return Err(FieldViolation::new(
                format!("{f}.names"),
                format!(
                    "must have one name per value ({}), got {}",
                    values.len(),
                    axis.names.len()
                ),
            ));
        }
        for (j, n) in axis.names.iter().enumerate() {
            let nf = format!("{f}.names[{j}]");
            check_name(&nf, n, MAX_VALUE_NAME_CHARS)?;
            if !n.chars().all(arm_name_char) {
                return Err(FieldViolation::new(
                    nf,
                    "may contain only A-Z a-z 0-9 _ . + = -",
                ));
            }
            if let Some(k) = axis.names[..j].iter().position(|m| m == n) {
                return Err(FieldViolation::new(
                    nf,
                    format!("repeats spec.grid[{i}].names[{k}]"),
                ));
            }
        }
        axis.names.clone()
    };
    Ok(Axis {
        path,
        values,
        names,
    })
}

/// Reads a JobSpec back from its JSON mapping after values were applied.
pub(super) fn from_json(v: Value) -> Result<v1::JobSpec, String> {
    serde_json::from_value(v).map_err(|e| e.to_string())
}

impl Axis {
    pub(super) fn field_text(&self) -> String {
        self.path.join(".")
    }
}
