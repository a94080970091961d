//! Picking a device. The one place that knows which burn backend serves the CPU.

use burn::tensor::Device;

/// The CPU device (burn's ndarray backend), computing in f32.
#[allow(deprecated)] // burn 0.22 deprecates ndarray in favour of `flex`; ndarray is the tested CPU path.
pub fn cpu() -> Device {
    Device::ndarray()
}

/// A device by name: `cpu`, `cuda` or `cuda:N` (the latter with the `cuda` feature).
pub fn from_name(name: &str) -> crate::Result<Device> {
    match name {
        "cpu" => Ok(cpu()),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => cuda_device(cuda),
        other => Err(crate::Error::Device(format!("unknown device {other:?} (expected cpu, cuda or cuda:N)"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str) -> crate::Result<Device> {
    let index = match name.strip_prefix("cuda:") {
        Some(index) => {
            index.parse::<usize>().map_err(|_| crate::Error::Device(format!("bad CUDA index in {name:?}")))?
        }
        None => 0,
    };
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_name: &str) -> crate::Result<Device> {
    Err(crate::Error::Device("this build has no CUDA support; rebuild with `--features cuda`".into()))
}
