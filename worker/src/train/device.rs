//! The training device: parsing `--device`, and waiting for queued device work.
//!
//! A leaf: must not import anything of `train`.

use tch::Device;

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `cuda` fails when libtorch sees no CUDA device.
pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    let s = s.trim().to_ascii_lowercase();
    let cuda = |i: usize| -> anyhow::Result<Device> {
        let n = tch::Cuda::device_count();
        anyhow::ensure!(
            n > 0,
            "device {s:?}: libtorch sees no CUDA device (is this a CUDA build of libtorch?)"
        );
        anyhow::ensure!(
            (i as i64) < n,
            "device {s:?}: only {n} CUDA device(s) visible"
        );
        Ok(Device::Cuda(i))
    };
    match s.as_str() {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => anyhow::bail!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

/// Waits for the device's queued work (CUDA); a no-op on the CPU.
pub fn sync_device(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").expect("cpu"), Device::Cpu);
        assert_eq!(parse_device(" CPU ").expect("cpu"), Device::Cpu);
        parse_device("auto").expect("auto always parses");
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        if !tch::Cuda::is_available() {
            let err = parse_device("cuda:0")
                .expect_err("no cuda here")
                .to_string();
            assert!(err.contains("no CUDA device"), "{err}");
        }
    }
}
