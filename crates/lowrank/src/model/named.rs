//! Every weight of a model under its HF name, in HF layout: what exporters write.

use candle_core::Tensor;

use super::transformer::Model;
use crate::Result;

impl Model {
    /// Every weight under its HF name, dense f32 (quantized weights dequantised), as HF stores it:
    /// Gemma's norms as `w`, not the `1 + w` the model multiplies by.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_weights_in(false)
    }

    /// [`Model::named_weights`], with the norms as the multipliers the model applies when
    /// `multipliers` (Gemma's `1 + w`, as llama.cpp's GGUF stores them).
    pub(crate) fn named_weights_in(&self, multipliers: bool) -> Result<Vec<(String, Tensor)>> {
        let gemma_w = self.config().family.is_gemma() && !multipliers;
        let norm = |w: &Tensor| -> Result<Tensor> { Ok(if gemma_w { (w - 1.0)? } else { w.clone() }) };
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_weight().to_dense()?)];
        for (l, b) in self.blocks().iter().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, w) in b.named_norms() {
                out.push((format!("{p}.{name}.weight"), norm(w)?));
            }
            for (name, proj) in b.named_projections() {
                out.push((format!("{p}.{name}.weight"), proj.base().weight().to_dense()?));
                if let Some(bias) = proj.base().bias() {
                    out.push((format!("{p}.{name}.bias"), bias.clone()));
                }
            }
        }
        out.push(("model.norm.weight".into(), norm(self.final_norm())?));
        if !self.config().tie_word_embeddings {
            out.push(("lm_head.weight".into(), self.head_weight().to_dense()?));
        }
        Ok(out)
    }
}
