//! The fuzzer's mutations: hostile field values chosen by kind (text with U+0000 and past every
//! limit, ids in every wrong form, integers at limits and maxima, NaN and infinities, unknown
//! enum values, huge lists and maps), and damage below the message level (invalid UTF-8, wrong
//! wire types, truncation, noise). Must not send anything: [`super::run`] does.

use prost_reflect::{DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage as _, Value};
use rand::rngs::StdRng;
use rand::Rng;

use super::Fixture;

/// Hostile text: NUL, control characters, past every length limit, ids in every wrong form.
pub(super) fn hostile_string(rng: &mut StdRng, fx: &Fixture) -> String {
    let id = fx.job(rng);
    match rng.random_range(0..20) {
        0 => String::new(),
        1 => "\0".into(),
        2 => format!("a\0b{id}"),
        3 => "x".repeat(33),
        4 => "x".repeat(129),
        5 => "y".repeat(257),
        6 => "z".repeat(4097),
        7 => "w".repeat(70_000),
        8 => "é".repeat(200),
        9 => "\u{202e}\u{200b}\u{feff}".into(),
        10 => format!("{{{id}}}"),
        11 => format!("urn:uuid:{id}"),
        12 => id.to_uppercase(),
        13 => id.replace('-', ""),
        14 => uuid::Uuid::new_v4().to_string(),
        15 => "../../etc/passwd".into(),
        16 => "%00%ff\n\r\t".into(),
        17 => fx.sweeps[0].clone(),
        18 => fx.artifacts[0].clone(),
        _ => id,
    }
}

pub(super) fn hostile_u64(rng: &mut StdRng) -> u64 {
    *[
        0,
        1,
        2,
        20,
        21,
        33,
        64,
        65,
        129,
        256,
        257,
        1000,
        1001,
        8192,
        8193,
        10_000,
        10_001,
        1 << 31,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        i64::MAX as u64,
        u64::MAX,
    ]
    .get(rng.random_range(0..22))
    .unwrap_or(&0)
}

pub(super) fn hostile_f64(rng: &mut StdRng) -> f64 {
    [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        0.0,
        -1.0,
        1e308,
        f64::MIN_POSITIVE,
        10.0,
        10.000001,
        100.000001,
    ][rng.random_range(0..11)]
}

/// A value of `kind` chosen to break something.
pub(super) fn hostile_value(kind: &Kind, rng: &mut StdRng, fx: &Fixture, depth: u32) -> Value {
    match kind {
        Kind::String => Value::String(hostile_string(rng, fx)),
        Kind::Bytes => {
            let n = [0usize, 1, 1000, 5 << 20, 9 << 20][rng.random_range(0..5)];
            Value::Bytes((0..n).map(|i| i as u8).collect::<Vec<u8>>().into())
        }
        Kind::Bool => Value::Bool(rng.random_bool(0.5)),
        Kind::Double => Value::F64(hostile_f64(rng)),
        Kind::Float => Value::F32(hostile_f64(rng) as f32),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(hostile_u64(rng) as u32),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(hostile_u64(rng)),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32([0, -1, i32::MIN, i32::MAX, 99][rng.random_range(0..5)])
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64([0, -1, i64::MIN, i64::MAX][rng.random_range(0..4)])
        }
        Kind::Enum(e) => {
            let known: Vec<i32> = e.values().map(|v| v.number()).collect();
            if rng.random_bool(0.3) {
                Value::EnumNumber([99, -1, 1000][rng.random_range(0..3)])
            } else {
                Value::EnumNumber(known[rng.random_range(0..known.len())])
            }
        }
        Kind::Message(m) => {
            let mut msg = DynamicMessage::new(m.clone());
            if depth < 3 {
                for _ in 0..rng.random_range(0..3) {
                    mutate(&mut msg, rng, fx, depth + 1);
                }
            }
            Value::Message(msg)
        }
    }
}

/// `v`, or a small value of its kind when it would make a long list or map huge.
fn small(v: Value) -> Value {
    use prost::Message as _;
    match v {
        Value::String(s) if s.len() > 64 => Value::String(s.chars().take(64).collect()),
        Value::Bytes(b) if b.len() > 64 => Value::Bytes(b.slice(..64)),
        Value::Message(m) if m.encoded_len() > 256 => {
            Value::Message(DynamicMessage::new(m.descriptor()))
        }
        other => other,
    }
}

/// One mutation of one field of `msg` (or of a sub-message).
pub(super) fn mutate(msg: &mut DynamicMessage, rng: &mut StdRng, fx: &Fixture, depth: u32) {
    let desc = msg.descriptor();
    let fields: Vec<_> = desc.fields().collect();
    if fields.is_empty() {
        return;
    }
    let field = &fields[rng.random_range(0..fields.len())];
    let kind = field.kind();
    if field.is_map() {
        let Kind::Message(entry) = &kind else { return };
        let key_kind = entry.map_entry_key_field().kind();
        let value_kind = entry.map_entry_value_field().kind();
        let n = [0usize, 1, 33, 300][rng.random_range(0..4)];
        let mut map = std::collections::HashMap::new();
        for i in 0..n {
            let key = match key_kind {
                Kind::String => MapKey::String(if i == 0 {
                    hostile_string(rng, fx)
                } else {
                    format!("k{i}")
                }),
                _ => MapKey::U32(i as u32),
            };
            map.insert(key, small(hostile_value(&value_kind, rng, fx, depth)));
        }
        msg.set_field(field, Value::Map(map));
    } else if field.is_list() {
        let n = [0usize, 1, 65, 257, 10_001, 120_000][rng.random_range(0..6)];
        let one = hostile_value(&kind, rng, fx, depth);
        // Long lists repeat one small value, so that a request stays a few MiB at most: past
        // the coordinator's 8 MiB limit is one case, not every long list.
        let one = if n > 100 { small(one) } else { one };
        msg.set_field(field, Value::List(vec![one; n]));
    } else if let (Kind::Message(_), true) = (&kind, rng.random_bool(0.5)) {
        // Go inside the existing sub-message, or clear it.
        if rng.random_bool(0.3) {
            msg.clear_field(field);
        } else if let Value::Message(inner) = msg.get_field_mut(field) {
            mutate(inner, rng, fx, depth + 1);
        }
    } else {
        msg.set_field(field, hostile_value(&kind, rng, fx, depth));
    }
}

/// Appends a field key: number and wire type.
pub(super) fn put_key(buf: &mut Vec<u8>, number: u32, wire_type: u32) {
    prost::encoding::encode_varint(u64::from((number << 3) | wire_type), buf);
}

/// Damage below the message level: invalid UTF-8, wrong wire types, truncation, noise.
pub(super) fn mutate_bytes(bytes: &mut Vec<u8>, desc: &MessageDescriptor, rng: &mut StdRng) {
    let strings: Vec<u32> = desc
        .fields()
        .filter(|f| f.kind() == Kind::String)
        .map(|f| f.number())
        .collect();
    let any: Vec<u32> = desc.fields().map(|f| f.number()).collect();
    match rng.random_range(0..5) {
        0 if !strings.is_empty() => {
            put_key(bytes, strings[rng.random_range(0..strings.len())], 2);
            let bad = [0xffu8, 0xfe, 0xc3, 0x28, 0x00];
            prost::encoding::encode_varint(bad.len() as u64, bytes);
            bytes.extend_from_slice(&bad);
        }
        1 if !any.is_empty() => {
            // A varint where a length-delimited field is expected, or the other way round.
            put_key(bytes, any[rng.random_range(0..any.len())], 0);
            prost::encoding::encode_varint(u64::MAX, bytes);
        }
        2 if bytes.len() > 1 => {
            let cut = rng.random_range(1..bytes.len());
            bytes.truncate(cut);
        }
        3 => {
            let n = rng.random_range(1..64);
            *bytes = (0..n).map(|_| rng.random::<u8>()).collect();
        }
        _ => {
            // A length prefix far past the end.
            put_key(bytes, 1, 2);
            prost::encoding::encode_varint(1 << 40, bytes);
        }
    }
}
