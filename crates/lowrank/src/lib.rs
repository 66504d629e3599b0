//! lowrank: LoRA adapters for transformer language models.
//!
//! The crate is laid out as its pipeline: [`model`] loads weights (HF safetensors directories or
//! GGUF files) into one transformer implementation in HF layout; [`ops`] holds the tensor ops that
//! training differentiates through; [`adapter`] reads PEFT adapters and applies them by module
//! path; [`tokenizer`] and [`chat`] turn text into ids, and [`prompt`] is the one rule for the ids a
//! request (or a training row's prompt) starts generation from; [`generate`] samples from the model; [`export`] writes models in other forms.
#![warn(missing_docs)]

pub mod adapter;
pub mod bundle;
pub mod chat;
pub mod data;
pub mod error;
pub mod export;
pub mod formats;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod module_table;
pub mod ops;
pub mod prompt;
pub mod pyjson;
pub mod serve;
pub mod staging;
pub mod threads;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
