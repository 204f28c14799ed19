//! Reads a job spec file (JSON, TOML or YAML) into a validated [`proto::spec::JobSpec`].
//!
//! All three formats use the schema of the proto's JSON mapping (`batchSize` or `batch_size`,
//! enum names as strings). Each file is deserialised straight from its own format's parser into
//! `v1::JobSpec` through pbjson's `Deserialize`, which rejects unknown fields; serde_path_to_error
//! records the field path and the format's parser the position, so an error reads
//! `spec.yaml:7:3: unknown field "lerning_rate" at training.lerning_rate (expected one of ...)`.
//! Then the spec goes through the same validator the coordinator runs.
//!
//! Must not talk to the network: parsing and validation only.

use std::path::Path;

use proto::v1;

/// The format of a spec file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Toml,
    Yaml,
}

impl Format {
    /// The format a file's extension names (`.json`, `.toml`, `.yaml`, `.yml`).
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(Format::Json),
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

/// Why a spec file could not be used. Every variant is bad input (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: unknown format: name the file .json, .toml, .yaml or .yml, or pass --format")]
    UnknownFormat { file: String },
    /// The file does not parse, or a field is unknown or of the wrong type.
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file parses but breaks a documented limit (the coordinator would refuse it).
    #[error("{file}: invalid spec: {violation}")]
    Invalid {
        file: String,
        violation: proto::spec::FieldViolation,
    },
}

/// Reads, parses and validates a spec file.
pub fn load(path: &Path, format: Option<Format>) -> Result<proto::spec::JobSpec, SpecError> {
    let (file, text, format) = read(path, format)?;
    let raw = parse(&file, &text, format)?;
    proto::spec::JobSpec::try_from(raw).map_err(|violation| SpecError::Invalid { file, violation })
}

/// The file's name as shown in errors, its text and its format.
fn read(path: &Path, format: Option<Format>) -> Result<(String, String, Format), SpecError> {
    let file = path.display().to_string();
    let format = format
        .or_else(|| Format::from_path(path))
        .ok_or_else(|| SpecError::UnknownFormat { file: file.clone() })?;
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        file: file.clone(),
        source,
    })?;
    Ok((file, text, format))
}

/// Reads and parses a sweep file (the `trainq.v1.SweepSpec` JSON mapping; grid values are free
/// JSON) and checks it with the coordinator's validator, so a bad arm is found before submit.
pub fn load_sweep(path: &Path, format: Option<Format>) -> Result<v1::SweepSpec, SpecError> {
    let (file, text, format) = read(path, format)?;
    let sweep: v1::SweepSpec = parse_as(&file, &text, format)?;
    check_sweep(&sweep).map_err(|violation| SpecError::Invalid { file, violation })?;
    Ok(sweep)
}

/// The coordinator's checks of a sweep (`proto::sweep`): the name, labels, seeds, the grid's
/// shape, and every arm's resulting job spec (and the source's).
pub fn check_sweep(sweep: &v1::SweepSpec) -> Result<(), proto::spec::FieldViolation> {
    proto::sweep::SweepPlan::try_from(sweep.clone()).map(|_| ())
}

/// Parses spec text of a format into the wire type (no validation beyond the schema).
pub fn parse(file: &str, text: &str, format: Format) -> Result<v1::JobSpec, SpecError> {
    parse_as(file, text, format)
}

/// Parses text of a format into any wire type with a proto JSON mapping (`v1::JobSpec`,
/// `v1::SweepSpec`): unknown fields are errors at file:line:column.
pub fn parse_as<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
    format: Format,
) -> Result<T, SpecError> {
    let located = match format {
        Format::Json => {
            let json_error = |path: String, inner: &serde_json::Error| {
                let suffix = format!(" at line {} column {}", inner.line(), inner.column());
                let message = inner.to_string();
                let message = message
                    .strip_suffix(&suffix)
                    .unwrap_or(&message)
                    .to_string();
                Located {
                    path,
                    message,
                    offset: offset_of(text, inner.line(), inner.column().saturating_sub(1)),
                }
            };
            let mut de = serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(&mut de)
                .map_err(|e| json_error(e.path().to_string(), e.inner()))
                .and_then(|spec| {
                    de.end()
                        .map(|()| spec)
                        .map_err(|e| json_error(".".into(), &e))
                })
        }
        Format::Toml => {
            let de = toml::Deserializer::parse(text).map_err(|e| Located {
                path: ".".into(),
                message: e.message().to_string(),
                offset: e.span().map(|s| s.start),
            });
            de.and_then(|de| {
                serde_path_to_error::deserialize(de).map_err(|e| Located {
                    path: e.path().to_string(),
                    message: e.inner().message().to_string(),
                    offset: e.inner().span().map(|s| s.start),
                })
            })
        }
        Format::Yaml => {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let inner = e.inner();
                let mut message = inner.to_string();
                if let Some(loc) = inner.location() {
                    let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                    if let Some(pos) = message.find(&suffix) {
                        message.replace_range(pos..pos + suffix.len(), "");
                    }
                }
                // serde_yaml prefixes its own path (`training: unknown field`); ours is added.
                if let Some((prefix, rest)) = message.split_once(": ") {
                    if !prefix.contains(' ') {
                        message = rest.to_string();
                    }
                }
                Located {
                    path: e.path().to_string(),
                    message,
                    offset: inner.location().map(|l| l.index()),
                }
            })
        }
    };
    located.map_err(|l| l.into_error(file, text))
}

/// A parse error before it is turned into line:column.
struct Located {
    /// Field path (`training.lerning_rate`), `.` at the root.
    path: String,
    message: String,
    /// Byte offset the parser reported.
    offset: Option<usize>,
}

impl Located {
    fn into_error(self, file: &str, text: &str) -> SpecError {
        let mut offset = self.offset.unwrap_or(0).min(text.len());
        let mut message = self.message.replace('`', "\"");
        // An unknown field: point at the key itself. Parsers report the position of the key, of
        // its end or of its value depending on the format, so look for the key on that line.
        if let Some(key) = unknown_field(&message) {
            offset = key_position(text, offset, &key);
        }
        let (line, column) = line_column(text, offset);
        if self.path != "." && !self.path.is_empty() {
            // Put the path after the first clause: `unknown field "x" at a.x (expected ...)`.
            match message.find(", expected") {
                Some(pos) => {
                    let rest = message[pos + 2..].to_string();
                    message.truncate(pos);
                    message = format!("{message} at {} ({rest})", self.path);
                }
                None => message = format!("{message} at {}", self.path),
            }
        }
        SpecError::Syntax {
            file: file.to_string(),
            line,
            column,
            message,
        }
    }
}

/// The field name of an `unknown field "name"` message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field \"")?;
    Some(rest[..rest.find('"')?].to_string())
}

/// Where `key` starts as a key on the line holding `offset` (or the nearest line above it),
/// quoted or not; `offset` itself when it cannot be found.
fn key_position(text: &str, offset: usize, key: &str) -> usize {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut line_end = text[offset..].find('\n').map_or(text.len(), |n| offset + n);
    // Look at the reported line and up to three lines above it.
    for _ in 0..4 {
        let line_start = text[..line_end].rfind('\n').map_or(0, |n| n + 1);
        let line = &text[line_start..line_end];
        let mut from = 0;
        while let Some(found) = line[from..].find(key) {
            let start = from + found;
            let end = start + key.len();
            let before = line[..start].chars().next_back();
            let after = line[end..].chars().next();
            if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
                let quoted = matches!(before, Some('"' | '\'')) && start > 0;
                return line_start + if quoted { start - 1 } else { start };
            }
            from = end;
        }
        if line_start == 0 {
            break;
        }
        line_end = line_start - 1;
    }
    offset
}

/// Byte offset of a 1-based line and 0-based character column.
fn offset_of(text: &str, line: usize, column: usize) -> Option<usize> {
    let start = if line <= 1 {
        0
    } else {
        text.match_indices('\n').nth(line - 2)?.0 + 1
    };
    let rest = &text[start..];
    Some(
        start
            + rest
                .char_indices()
                .nth(column)
                .map_or(rest.len(), |(i, _)| i),
    )
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |n| n + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{
  "name": "mnist-small",
  "labels": {"suite": "cli"},
  "training": {
    "epochs": 2,
    "batchSize": 64,
    "learningRate": 0.001,
    "optimizer": "OPTIMIZER_ADAM",
    "seed": "42",
    "maxTrainExamples": 256
  },
  "mnistClassifier": {}
}
"#;

    const TOML: &str = r#"name = "mnist-small"
mnistClassifier = {}

[labels]
suite = "cli"

[training]
epochs = 2
batchSize = 64
learningRate = 0.001
optimizer = "OPTIMIZER_ADAM"
seed = 42
maxTrainExamples = 256
"#;

    const YAML: &str = r#"# a small classifier run
name: mnist-small
labels:
  suite: cli
training:
  epochs: 2
  batch_size: 64
  learningRate: 0.001
  optimizer: OPTIMIZER_ADAM
  seed: 42
  maxTrainExamples: 256
mnistClassifier: {}
"#;

    fn syntax(err: SpecError) -> (usize, usize, String) {
        match err {
            SpecError::Syntax {
                line,
                column,
                message,
                ..
            } => (line, column, message),
            other => panic!("expected a syntax error, got {other}"),
        }
    }

    #[test]
    fn every_example_spec_in_the_repository_loads_and_validates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
            let path = entry.expect("entry").path();
            if Format::from_path(&path).is_some() {
                // Sweep files hold a `base` spec; job spec files do not.
                let text = std::fs::read_to_string(&path).expect("read example");
                if text
                    .lines()
                    .any(|l| l.starts_with("base:") || l.contains("\"base\""))
                {
                    load_sweep(&path, None).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                } else {
                    load(&path, None).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                }
                loaded += 1;
            }
        }
        assert!(loaded >= 1, "no example spec found in {}", dir.display());
    }

    const SWEEP: &str = r#"name: study
seeds: [1, 2]
source:
  name: src
  training: {epochs: 1, batchSize: 64, learningRate: 0.001}
  mnistClassifier: {}
base:
  name: cvae
  training: {epochs: 2, batchSize: 64, learningRate: 0.001}
  cifarCvae: {init: {random: {}}}
grid:
  - field: cifarCvae.init
    names: [random, frozen]
    values:
      - random: {}
      - transfer: {conv1: CONV1_ADAPTATION_LUMINANCE, copyConv2: true, freeze: {firstEpochs: 1}}
"#;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn a_sweep_file_with_free_json_grid_values_loads_and_every_arm_validates() {
        let (_d, path) = write("sweep.yaml", SWEEP);
        let sweep = load_sweep(&path, None).expect("valid sweep");
        assert_eq!(sweep.seeds, vec![1, 2]);
        assert_eq!(sweep.grid[0].values.len(), 2);
        // A value that makes an arm invalid is named with the arm.
        let (_d, path) = write(
            "bad.yaml",
            &SWEEP.replace("firstEpochs: 1", "firstEpochs: 0"),
        );
        let err = load_sweep(&path, None)
            .expect_err("freeze of 0 epochs")
            .to_string();
        assert!(
            err.contains("spec.grid[0].values[1]") && err.contains("first_epochs"),
            "{err}"
        );
        let (_d, path) = write("names.yaml", &SWEEP.replace("[random, frozen]", "[random]"));
        let err = load_sweep(&path, None)
            .expect_err("one name for two values")
            .to_string();
        assert!(err.contains("spec.grid[0].names"), "{err}");
    }

    #[test]
    fn an_unknown_sweep_field_is_named_with_its_line_and_column() {
        let text = SWEEP.replace("names:", "nmes:");
        let (line, column, message) =
            syntax(parse_as::<v1::SweepSpec>("s.yaml", &text, Format::Yaml).expect_err("unknown"));
        assert_eq!((line, column), (13, 5), "{message}");
        assert!(
            message.starts_with("unknown field \"nmes\" at grid[0].nmes"),
            "{message}"
        );
        let text = SWEEP.replace(
            "learningRate: 0.001}\n  cifarCvae",
            "lr: 0.001}\n  cifarCvae",
        );
        let err = parse_as::<v1::SweepSpec>("s.yaml", &text, Format::Yaml).expect_err("unknown");
        assert!(err.to_string().contains("base.training.lr"), "{err}");
    }

    #[test]
    fn the_same_spec_in_json_toml_and_yaml_parses_to_the_same_wire_spec() {
        let json = parse("a.json", JSON, Format::Json).expect("json");
        let toml = parse("a.toml", TOML, Format::Toml).expect("toml");
        let yaml = parse("a.yaml", YAML, Format::Yaml).expect("yaml");
        assert_eq!(json, toml);
        assert_eq!(json, yaml);
        assert_eq!(json.training.as_ref().map(|t| t.seed), Some(42));
        assert!(proto::spec::JobSpec::try_from(json).is_ok());
    }

    #[test]
    fn an_unknown_json_field_is_named_with_its_line_and_column() {
        let text = JSON.replace("\"learningRate\"", "\"lerning_rate\"");
        let (line, column, message) =
            syntax(parse("spec.json", &text, Format::Json).expect_err("unknown field"));
        assert_eq!((line, column), (7, 5), "{message}");
        assert!(
            message.starts_with("unknown field \"lerning_rate\" at training.lerning_rate"),
            "{message}"
        );
        assert!(message.contains("expected one of"), "{message}");
    }

    #[test]
    fn an_unknown_toml_field_is_named_with_its_line_and_column() {
        let text = TOML.replace("learningRate", "lerning_rate");
        let (line, column, message) =
            syntax(parse("spec.toml", &text, Format::Toml).expect_err("unknown field"));
        assert_eq!((line, column), (10, 1), "{message}");
        assert!(
            message.starts_with("unknown field \"lerning_rate\" at training.lerning_rate"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_yaml_field_is_named_with_its_line_and_column() {
        let text = YAML.replace("learningRate", "lerning_rate");
        let (line, column, message) =
            syntax(parse("spec.yaml", &text, Format::Yaml).expect_err("unknown field"));
        assert_eq!((line, column), (8, 3), "{message}");
        assert!(
            message.starts_with("unknown field \"lerning_rate\" at training.lerning_rate"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_top_level_yaml_field_is_found_at_the_root() {
        let text = YAML.replace("labels:", "lables:");
        let err = parse("spec.yaml", &text, Format::Yaml).expect_err("unknown field");
        let shown = err.to_string();
        assert!(
            shown.starts_with("spec.yaml:3:1: unknown field \"lables\""),
            "{shown}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_is_an_error_with_a_position() {
        let text = YAML.replace("epochs: 2", "epochs: many");
        let (line, _, message) =
            syntax(parse("spec.yaml", &text, Format::Yaml).expect_err("bad type"));
        assert_eq!(line, 6, "{message}");
        assert!(message.contains("training.epochs"), "{message}");
    }

    #[test]
    fn broken_syntax_is_an_error_with_a_position() {
        let (line, _, _) = syntax(
            parse("spec.toml", "name = \"x\"\n[training\n", Format::Toml).expect_err("syntax"),
        );
        assert_eq!(line, 2);
        let (line, _, _) =
            syntax(parse("spec.json", "{\n  \"name\": }\n", Format::Json).expect_err("syntax"));
        assert_eq!(line, 2);
    }

    #[test]
    fn a_spec_that_breaks_a_limit_names_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.yml");
        std::fs::write(&path, YAML.replace("batch_size: 64", "batch_size: 100000")).expect("write");
        let err = load(&path, None).expect_err("too big a batch");
        assert!(
            err.to_string().contains("spec.training.batch_size"),
            "{err}"
        );
    }

    #[test]
    fn the_format_comes_from_the_extension_or_the_flag() {
        assert_eq!(Format::from_path(Path::new("a.YML")), Some(Format::Yaml));
        assert_eq!(Format::from_path(Path::new("a.toml")), Some(Format::Toml));
        assert_eq!(Format::from_path(Path::new("a.spec")), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.spec");
        std::fs::write(&path, TOML).expect("write");
        assert!(matches!(
            load(&path, None),
            Err(SpecError::UnknownFormat { .. })
        ));
        assert!(load(&path, Some(Format::Toml)).is_ok());
    }
}
