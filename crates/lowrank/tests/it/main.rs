//! The library's integration tests, one test binary (one link of candle instead of one per file):
//! each file is a module named for what it checks; `common/` holds the shared fixture loaders.

mod common;

mod adapter_save;
mod bad_input;
mod bf16;
mod combine;
mod data;
mod default_model;
mod dora;
mod export;
mod fuzz;
mod gguf_adapter;
mod inits;
mod invariants;
mod layering;
mod model_parity;
mod multimodal;
mod mutate;
mod qlora;
mod serve_engine;
mod tokenizer;
mod train;
mod train_parity;
