//! PiSSA and OLoRA's training protocol ([`crate::adapter::Adapter::relative_to_original`] has the
//! math): their init takes `s·B₀A₀` out of the base, training runs on that residual base, and the
//! result is handed back for the original base — the model restored, the adapter converted to a
//! plain rank-`2r` LoRA that loads on the unmodified base anywhere.

use std::sync::Arc;

use crate::adapter::{ActiveAdapter, Adapter};
use crate::model::Model;
use crate::Result;

/// A model whose base holds the residual of a PiSSA / OLoRA init while an adapter trains on it.
#[derive(Debug)]
pub struct ResidualBase {
    start: Arc<Adapter>,
}

impl ResidualBase {
    /// Takes the initial adapter `start`'s update out of `model` when its init needs that (PiSSA,
    /// OLoRA); `None` (and the model untouched) for every other init. A resumed run does it again:
    /// the init is a function of the weights.
    pub fn enter(model: &mut Model, start: &Arc<Adapter>) -> Result<Option<ResidualBase>> {
        if !start.takes_from_base() {
            return Ok(None);
        }
        model.unmerge(&[ActiveAdapter { adapter: start.clone(), weight: 1.0 }])?;
        Ok(Some(ResidualBase { start: start.clone() }))
    }

    /// Restores `model`'s original base and returns `trained` as an adapter for it.
    pub fn leave(self, model: &mut Model, trained: &Adapter) -> Result<Adapter> {
        model.merge(&[ActiveAdapter { adapter: self.start.clone(), weight: 1.0 }])?;
        trained.relative_to_original(&self.start, model.modules())
    }
}
