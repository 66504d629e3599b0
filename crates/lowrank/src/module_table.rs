//! The adaptable projections of a model, by id and by HF module path: the seam between the model
//! (which builds a projection for each entry, [`crate::model::LinearFactory`]) and adapters (which
//! hold one layer per entry they adapt). Both sides import this leaf; neither imports the other's
//! internals for it.

use std::collections::HashMap;

use crate::{Error, Result};

/// One adaptable projection of the model.
#[derive(Clone, Debug)]
pub struct ModuleInfo {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Block index, when inside a block.
    pub layer: Option<usize>,
    /// In-features `K`.
    pub in_features: usize,
    /// Out-features `M`.
    pub out_features: usize,
}

impl ModuleInfo {
    /// Last path component (`q_proj`).
    pub fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }
}

/// Every adaptable projection, by id (the order of construction) and by path.
#[derive(Clone, Debug, Default)]
pub struct ModuleTable {
    modules: Vec<ModuleInfo>,
    by_path: HashMap<String, usize>,
}

impl ModuleTable {
    /// All modules in model order.
    pub fn modules(&self) -> &[ModuleInfo] {
        &self.modules
    }

    /// The id of a module path.
    pub fn id(&self, path: &str) -> Option<usize> {
        self.by_path.get(path).copied()
    }

    /// The id of a module named as a checkpoint or a text-only tool may name it: exactly, or, for
    /// the text model of a multimodal model (paths under `model.language_model.`), as the text
    /// model alone (`model.layers.…`, llama.cpp's names) or as transformers stores it
    /// (`language_model.model.layers.…`, PEFT adapters of transformers < 4.52).
    pub fn lookup(&self, path: &str) -> Option<usize> {
        self.id(path).or_else(|| {
            let rest = path.strip_prefix("language_model.model.").or_else(|| path.strip_prefix("model."))?;
            self.id(&format!("model.language_model.{rest}"))
        })
    }

    /// Whether these are the text model's modules inside a multimodal model (`model.language_model.…`).
    pub fn is_language_model(&self) -> bool {
        self.modules.first().is_some_and(|m| m.path.starts_with("model.language_model."))
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Appends a module; returns its id.
    pub(crate) fn push(&mut self, module: ModuleInfo) -> usize {
        let id = self.modules.len();
        self.by_path.insert(module.path.clone(), id);
        self.modules.push(module);
        id
    }
}

/// An [`Error::ShapeMismatch`] unless the shapes agree.
pub fn check_shape(name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected != found {
        return Err(Error::ShapeMismatch { name: name.into(), expected: expected.into(), found: found.into() });
    }
    Ok(())
}
