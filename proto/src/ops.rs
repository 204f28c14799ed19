//! Small operational types that the coordinator, the worker and the CLI share: a secret that
//! never shows in `Debug` output, and where a metrics endpoint listens.

use std::fmt;
use std::net::SocketAddr;

/// A secret (a bearer token) from the command line, the environment or a file. Its `Debug`
/// output is `<redacted>`, so logging a configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a Prometheus endpoint (`GET /metrics`) listens: an address, or nowhere (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::At)
            .map_err(|e| format!("expected HOST:PORT or `off`: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        assert_eq!(format!("{:?}", Secret::from("hunter2")), "<redacted>");
    }

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        assert_eq!("OFF".parse::<MetricsListen>(), Ok(MetricsListen::Off));
        assert_eq!(
            "127.0.0.1:0".parse::<MetricsListen>(),
            Ok(MetricsListen::At(SocketAddr::from(([127, 0, 0, 1], 0))))
        );
        assert!("9091".parse::<MetricsListen>().is_err());
    }
}
