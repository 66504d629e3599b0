//! Which modules an adapter config targets, and with what rank and scale — PEFT's
//! `check_target_module_exists` and `get_pattern_key`, by module path.

use std::path::Path;

use regex::Regex;

use super::config::{AdapterConfig, LayerSelector, ModuleSelector, StringOrList};
use crate::module_table::ModuleTable;
use crate::{Error, Result};

/// How one module is adapted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModulePlan {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
}

/// For every module of the table (by id), its plan or `None` when not targeted.
pub fn plan(cfg: &AdapterConfig, table: &ModuleTable, path: &Path) -> Result<Vec<Option<ModulePlan>>> {
    let err = |m: String| Error::Adapter { path: path.into(), message: m };
    let full = |pat: &str| Regex::new(&format!("^(?:{pat})$")).map_err(|e| err(format!("bad regex `{pat}`: {e}")));
    let target = match &cfg.target_modules {
        Some(ModuleSelector::Pattern(p)) if p == "all-linear" => Matcher::All,
        Some(ModuleSelector::Pattern(p)) => Matcher::Regex(full(p)?),
        Some(ModuleSelector::List(l)) => Matcher::Names(l.clone()),
        None => return Err(err("target_modules is missing".into())),
    };
    let exclude = match &cfg.exclude_modules {
        Some(ModuleSelector::Pattern(p)) => Some(Matcher::Regex(full(p)?)),
        Some(ModuleSelector::List(l)) if !l.is_empty() => Some(Matcher::Names(l.clone())),
        _ => None,
    };
    let layer_re = layer_regexes(cfg).map_err(|e| err(format!("bad layers_pattern: {e}")))?;
    let pattern = |keys: Vec<&String>| -> Result<Vec<(String, Regex)>> {
        keys.into_iter()
            .map(|k| {
                Regex::new(&format!("^(.*\\.)?({k})$"))
                    .map(|r| (k.clone(), r))
                    .map_err(|e| err(format!("bad pattern key `{k}`: {e}")))
            })
            .collect()
    };
    let rank_keys = pattern(cfg.rank_pattern.keys().collect())?;
    let alpha_keys = pattern(cfg.alpha_pattern.keys().collect())?;

    let mut out = Vec::with_capacity(table.len());
    for m in table.modules() {
        let key = m.path.as_str();
        let excluded = exclude.as_ref().is_some_and(|e| e.matches(key));
        let mut found = !excluded && target.matches(key);
        // PEFT applies layers_to_transform only to list targets, not to a regex string.
        if found && matches!(target, Matcher::Names(_)) {
            if let Some(sel) = &cfg.layers_to_transform {
                let idx = layer_re
                    .iter()
                    .find_map(|re| re.captures(key))
                    .and_then(|c| c.get(1)?.as_str().parse::<usize>().ok());
                found = match (idx, sel) {
                    (None, _) => false,
                    (Some(i), LayerSelector::One(l)) => i == *l,
                    (Some(i), LayerSelector::Many(ls)) => ls.is_empty() || ls.contains(&i),
                };
            }
        }
        if !found {
            out.push(None);
            continue;
        }
        let r = first_match(&rank_keys, key).map_or(cfg.r, |k| cfg.rank_pattern[k]);
        // Past the larger side of the projection a rank adds nothing but memory (r = 10⁹ would be
        // an allocation failure, not an error).
        let widest = m.in_features.max(m.out_features);
        if r > widest {
            return Err(err(format!(
                "rank {r} for `{key}` is larger than the module ({} x {}); use at most {widest}",
                m.out_features, m.in_features
            )));
        }
        let alpha = first_match(&alpha_keys, key).map_or(cfg.lora_alpha, |k| cfg.alpha_pattern[k]);
        let scale = if cfg.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        out.push(Some(ModulePlan { r, alpha, scale }));
    }
    Ok(out)
}

enum Matcher {
    All,
    Regex(Regex),
    Names(Vec<String>),
}

impl Matcher {
    fn matches(&self, key: &str) -> bool {
        match self {
            Matcher::All => true,
            Matcher::Regex(r) => r.is_match(key),
            Matcher::Names(names) => {
                names.iter().any(|n| key == n || key.strip_suffix(n.as_str()).is_some_and(|p| p.ends_with('.')))
            }
        }
    }
}

fn first_match<'a>(keys: &'a [(String, Regex)], path: &str) -> Option<&'a String> {
    keys.iter().find(|(_, r)| r.is_match(path)).map(|(k, _)| k)
}

/// Regexes whose first group is the layer index, in PEFT's order.
fn layer_regexes(cfg: &AdapterConfig) -> std::result::Result<Vec<Regex>, regex::Error> {
    let patterns: Vec<String> = match &cfg.layers_pattern {
        None => vec![],
        Some(StringOrList::One(s)) if s.is_empty() => vec![],
        Some(StringOrList::One(s)) => vec![s.clone()],
        Some(StringOrList::Many(v)) => v.clone(),
    };
    if patterns.is_empty() {
        return Ok(vec![Regex::new(r"^.*?\.[^.]*\.(\d+)\.")?]);
    }
    patterns.iter().map(|p| Regex::new(&format!(r"^(?:|.*?\.){p}\.(\d+)\."))).collect()
}
