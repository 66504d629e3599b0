//! The f32 (and bf16) values behind candle's storages, for the CPU kernels of the custom ops.

use candle_core::{CpuStorage, Layout, Storage};

/// The contiguous f32 values of a CPU storage under `l`.
pub(crate) fn values<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("custom op: operand is not contiguous") };
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// The same for a tensor's storage (from `storage_and_layout`), which must be on the CPU.
pub(crate) fn stored<'a>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => values(c, l),
        _ => candle_core::bail!("custom op: operand is not on the CPU"),
    }
}

/// The contiguous bf16 values of a tensor's CPU storage (from `storage_and_layout`).
pub(crate) fn stored_bf16<'a>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [half::bf16]> {
    let (Storage::Cpu(c), Some((a, b))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("custom op: operand is not contiguous on the CPU")
    };
    Ok(&c.as_slice::<half::bf16>()?[a..b])
}
