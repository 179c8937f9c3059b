//! The device a worker renders on. It comes from configuration and must exist: asking for
//! `cuda:0` where there is no CUDA is an error at start-up, never a silent CPU run.

use tch::{Cuda, Device};

use crate::{Error, Result};

/// Parses `auto`, `cpu` or `cuda:N` and checks that the device is there.
pub fn parse_device(s: &str) -> Result<Device> {
    let cuda_devices = if Cuda::is_available() { Cuda::device_count() as usize } else { 0 };
    choose_device(s, cuda_devices)
}

/// `parse_device` on a machine with `cuda_devices` visible CUDA devices.
fn choose_device(s: &str, cuda_devices: usize) -> Result<Device> {
    match s {
        "auto" => Ok(if cuda_devices > 0 { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let index: usize = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Error::Device(format!("{s:?} is not a device; use auto, cpu or cuda:N")))?;
            if cuda_devices == 0 {
                return Err(Error::Device(format!("--device {s}: CUDA is not available on this machine")));
            }
            if index >= cuda_devices {
                return Err(Error::Device(format!("--device {s}: this machine has {cuda_devices} CUDA device(s)")));
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
    fn auto_takes_the_first_gpu_when_there_is_one() {
        assert_eq!(choose_device("auto", 0).unwrap(), Device::Cpu);
        assert_eq!(choose_device("auto", 2).unwrap(), Device::Cuda(0));
        assert_eq!(choose_device("cuda:1", 2).unwrap(), Device::Cuda(1));
    }

    #[test]
    fn nonsense_and_missing_cuda_are_refused() {
        assert!(choose_device("tpu", 1).unwrap_err().to_string().contains("not a device"));
        assert!(choose_device("cuda:x", 1).unwrap_err().to_string().contains("not a device"));
        let msg = choose_device("cuda:0", 0).unwrap_err().to_string();
        assert!(msg.contains("CUDA is not available"), "{msg}");
        let msg = choose_device("cuda:2", 2).unwrap_err().to_string();
        assert!(msg.contains("this machine has 2 CUDA device(s)"), "{msg}");
    }
}
