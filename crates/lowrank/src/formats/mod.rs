//! File formats that both the model and adapters read, as leaves: memory-mapped safetensors files
//! and llama.cpp's GGUF tensor names and q/k row order.

mod gguf_header;
pub mod gguf_names;
mod safetensors;

pub use self::gguf_header::read_content as read_gguf;
pub use self::safetensors::SafetensorsDir;
