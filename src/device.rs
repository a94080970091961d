//! Picking a device. The one place that knows which burn backend serves the CPU.

use burn::tensor::Device;

/// The CPU device (burn's ndarray backend), computing in f32.
#[allow(deprecated)] // burn 0.22 deprecates ndarray in favour of `flex`; ndarray is the tested CPU path.
pub fn cpu() -> Device {
    Device::ndarray()
}
