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
            let d = Device::new_cuda(ordinal)?;
            #[cfg(feature = "cuda")]
            if let Err(e) = crate::kernels::cuda::retain_pool_memory(&d) {
                tracing::warn!("CUDA memory pool left at its defaults: {e}");
            }
            Ok(d)
        }
        other => Err(Error::param(
            "device",
            format!("unknown device `{other}` (cpu | cuda | cuda:N)"),
        )),
    }
}

/// `auto` (the first GPU when this build has CUDA and one is present, else the CPU), or any
/// [`parse_device`] spec. `auto` never fails: a GPU that cannot be opened means the CPU, with
/// the reason logged.
pub fn resolve_device(spec: &str) -> Result<Device> {
    if spec != "auto" {
        return parse_device(spec);
    }
    if !candle_core::utils::cuda_is_available() {
        return Ok(Device::Cpu);
    }
    match parse_device("cuda:0") {
        Ok(d) => Ok(d),
        Err(e) => {
            tracing::warn!("no usable GPU ({e}); training on the CPU");
            Ok(Device::Cpu)
        }
    }
}

/// `cpu`, `cuda:N` or `metal:N`: what events and summaries report.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert!(matches!(resolve_device("auto").unwrap(), Device::Cpu) || cfg!(feature = "cuda"));
        assert_eq!(device_name(&parse_device("cpu").unwrap()), "cpu");
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device"), "{e}");
        if !cfg!(feature = "cuda") {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
