//! The device a worker renders on. It comes from configuration and must exist: asking for
//! `cuda:0` where there is no CUDA is an error at start-up, never a silent CPU run.

use tch::{Cuda, Device};

use crate::{Error, Result};

/// Parses `auto`, `cpu` or `cuda:N` and checks that the device is there.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(if Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let index: usize = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::Device(format!("{s:?} is not a device; use auto, cpu or cuda:N")))?;
            if !Cuda::is_available() {
                return Err(Error::Device(format!("--device {s}: CUDA is not available on this machine")));
            }
            let count = Cuda::device_count() as usize;
            if index >= count {
                return Err(Error::Device(format!("--device {s}: this machine has {count} CUDA device(s)")));
            }
            Ok(Device::Cuda(index))
        }
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_always_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        parse_device("auto").unwrap();
    }

    #[test]
    fn nonsense_and_missing_cuda_are_refused() {
        assert!(parse_device("tpu").unwrap_err().to_string().contains("not a device"));
        if !Cuda::is_available() {
            let msg = parse_device("cuda:0").unwrap_err().to_string();
            assert!(msg.contains("CUDA is not available"), "{msg}");
        }
    }
}
