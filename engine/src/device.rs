use crate::{Error, Result};
use candle_core::Device;

/// `cpu` or `cuda[:N]`. CUDA is one crate feature away; without it the error says so.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| {
                    n.parse()
                        .map_err(|_| Error::param("device", format!("bad ordinal in `{s}`")))
                })
                .transpose()?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::param(
                    "device",
                    "this build has no CUDA support; rebuild with `--features cuda` (see the README's deploy section)",
                ));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => Err(Error::param(
            "device",
            format!("unknown device `{other}` (cpu | cuda | cuda:N)"),
        )),
    }
}

pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
