//! Log set-up of trainq's binaries: tracing, filtered by `RUST_LOG` (default `info`), as text or
//! JSON lines, to stdout or stderr.
//!
//! Must not be initialised more than once per process ([`init`] sets the global subscriber), and
//! must not log secrets itself (it logs nothing).

use std::str::FromStr;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// The filter from `RUST_LOG`, `info` when unset or invalid.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A subscriber writing `format` lines that pass `filter` to `writer`.
pub fn subscriber<W>(
    format: Format,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        Format::Text => Box::new(builder.finish()),
        Format::Json => Box::new(builder.json().finish()),
    }
}

/// Sets the process's subscriber (once; a second call is ignored).
pub fn init(format: Format, output: Output) {
    let subscriber = match output {
        Output::Stdout => subscriber(format, env_filter(), std::io::stdout),
        Output::Stderr => subscriber(format, env_filter(), std::io::stderr),
    };
    let _ = tracing::subscriber::set_global_default(subscriber);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("buffer").clone()).expect("utf-8")
        }
    }

    fn capture(format: Format, filter: &str) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(format, EnvFilter::new(filter), move || writer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", job_id = "j1", attempt = 2);
            let _entered = span.enter();
            tracing::info!(step = 7, "trained");
            tracing::debug!("hidden at info");
        });
        buffer.text()
    }

    #[test]
    fn json_lines_carry_fields_and_the_span_and_the_filter_applies() {
        let out = capture(Format::Json, "info");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert!(
            lines[0].starts_with('{') && lines[0].contains("\"step\":7"),
            "{out}"
        );
        assert!(lines[0].contains("\"attempt\":2"), "{out}");
        let text = capture(Format::Text, "debug");
        assert!(
            text.contains("trained") && text.contains("hidden at info"),
            "{text}"
        );
        assert!(!text.starts_with('{'), "{text}");
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse(), Ok(Format::Json));
        assert_eq!(" Text ".parse(), Ok(Format::Text));
        assert!("yaml".parse::<Format>().is_err());
    }
}
