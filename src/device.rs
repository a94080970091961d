//! Picking a device. The one place that knows which burn backend serves the CPU.

use burn::tensor::Device;

/// The CPU device: burn's flex backend (`gemm` matrix products with AVX2 / AVX-512 chosen at run
/// time, threads on every core through rayon; `RAYON_NUM_THREADS` sets how many), computing in
/// f32.
pub fn cpu() -> Device {
    Device::flex()
}

/// A device by name: `cpu`; `cuda` or `cuda:N` (with the `cuda` feature); `wgpu` (any Vulkan,
/// Metal or DX12 GPU, shaders in WGSL; with the `wgpu` feature).
pub fn from_name(name: &str) -> crate::Result<Device> {
    match name {
        "cpu" => Ok(cpu()),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => cuda_device(cuda),
        "wgpu" => wgpu_device(),
        other => Err(crate::Error::Device(format!("unknown device {other:?} (expected cpu, cuda, cuda:N or wgpu)"))),
    }
}

/// The default adapter of burn's wgpu runtime, initialised once per process (a runtime cannot be
/// initialised twice): WGSL shaders on whichever graphics API the machine offers.
#[cfg(feature = "wgpu")]
fn wgpu_device() -> crate::Result<Device> {
    static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let device = DEVICE.get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string()));
    device.clone().map_err(|reason| {
        crate::Error::Device(format!(
            "no GPU adapter for wgpu: {reason}. Install a Vulkan driver (on Debian or Ubuntu: \
             mesa-vulkan-drivers and libvulkan1; `vulkaninfo --summary` lists what the machine has), \
             or use --device cpu"
        ))
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> crate::Result<Device> {
    Err(crate::Error::Device("this build has no wgpu support; rebuild with `--features wgpu`".into()))
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str) -> crate::Result<Device> {
    let index = match name.strip_prefix("cuda:") {
        Some(index) => {
            index.parse::<usize>().map_err(|_| crate::Error::Device(format!("bad CUDA index in {name:?}")))?
        }
        None => 0,
    };
    check_cuda_runtime(index)?;
    Ok(Device::cuda(index))
}

/// What the CUDA backend needs at run time, checked up front: burn, cubecl and cudarc would panic
/// at the first kernel instead.
#[cfg(feature = "cuda")]
fn check_cuda_runtime(index: usize) -> crate::Result<()> {
    use crate::Error::Device as error;
    // SAFETY: these only try to dlopen the libraries by name.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(error(
            "the CUDA driver library (libcuda.so) is not on the loader path: install the NVIDIA driver, \
             or add its folder to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(error(
            "NVRTC (libnvrtc.so) is not on the loader path: add the CUDA toolkit's lib64 folder (or the \
             nvidia-cuda-nvrtc wheel's lib folder) to LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let include = cubecl::cuda::install::cuda_path().map(|path| path.join("include"));
    if !include.as_ref().is_some_and(|include| include.join("cuda.h").is_file()) {
        let looked = include.map_or("/usr/local/cuda/include, /opt/cuda/include".into(), |p| p.display().to_string());
        return Err(error(format!(
            "CUDA headers not found (looked for cuda.h in {looked}): kernels are compiled at run time and need \
             them; set CUDA_PATH to the CUDA installation (CUDA_HOME is not read)"
        )));
    }
    cudarc::driver::result::init().map_err(|e| error(format!("cannot initialise CUDA: {e}")))?;
    let count = cudarc::driver::result::device::get_count().map_err(|e| error(format!("cannot count GPUs: {e}")))?;
    if index >= count as usize {
        return Err(error(format!("no CUDA device {index}: this machine has {count}")));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_name: &str) -> crate::Result<Device> {
    Err(crate::Error::Device("this build has no CUDA support; rebuild with `--features cuda`".into()))
}
