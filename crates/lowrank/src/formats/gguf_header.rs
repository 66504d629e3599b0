//! A GGUF file's header read safely: candle's reader trusts two things a crafted file can break
//! (`general.alignment = 0` divides by zero; tensor dimensions whose product overflows wrap to a
//! small element count), so the alignment is found by a bounded scan first and every tensor's
//! size is checked with checked arithmetic against the file after. Errors name the file.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Content;

use crate::{Error, Result};

/// Parses the header of the GGUF file at `path`; the reader is positioned for tensor reads.
pub fn read_content(path: &Path) -> Result<(Content, BufReader<File>)> {
    let err = |m: String| Error::Gguf { path: path.into(), message: m };
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let len = file.metadata().map_err(|e| Error::io("reading", path, e))?.len();
    let mut reader = BufReader::new(file);
    if let Some(a) = alignment(&mut reader, len).map_err(|m| err(format!("not a readable GGUF file ({m})")))? {
        if a == 0 || !a.is_power_of_two() {
            return Err(err(format!("general.alignment is {a}; it must be a power of two")));
        }
    }
    reader.seek(SeekFrom::Start(0)).map_err(|e| Error::io("reading", path, e))?;
    let content = Content::read(&mut reader).map_err(|e| err(format!("not a readable GGUF file ({e})")))?;
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let block = info.ggml_dtype.block_size();
        let bytes = elems
            .filter(|&n| n > 0 && n % block == 0 && dims.last().is_some_and(|&d| d % block == 0))
            .and_then(|n| (n / block).checked_mul(info.ggml_dtype.type_size()));
        let end = bytes.and_then(|b| content.tensor_data_offset.checked_add(info.offset)?.checked_add(b as u64));
        if end.is_none_or(|e| e > len) {
            return Err(err(format!(
                "tensor `{name}` of shape {dims:?} ({:?}) does not fit the file: no elements, a row that does not split \
                 into the type's blocks, or more bytes than the file's {len}",
                info.ggml_dtype
            )));
        }
    }
    Ok((content, reader))
}

/// `general.alignment` if the header sets it as an integer, by a scan that reads lengths and
/// counts only as far as the file goes.
fn alignment(r: &mut BufReader<File>, len: u64) -> std::result::Result<Option<u64>, String> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic != b"GGUF" {
        return Err("no GGUF magic".into());
    }
    let version = u32_le(r)?;
    let wide = version >= 2; // v1 has 32-bit counts and lengths
    let count = |r: &mut BufReader<File>| if wide { u64_le(r) } else { u32_le(r).map(u64::from) };
    let _tensors = count(r)?;
    let kvs = count(r)?;
    // The last one counts, as in candle's map of the metadata.
    let mut found = None;
    for _ in 0..kvs {
        let key_len = count(r)?;
        let key = read_bytes(r, key_len, len)?;
        let ty = u32_le(r)?;
        if key != b"general.alignment" || ty > 5 {
            skip_value(r, ty, wide, len, 0)?;
            continue;
        }
        let two = |r: &mut BufReader<File>| -> std::result::Result<[u8; 2], String> {
            let b = read_bytes(r, 2, len)?;
            Ok([b[0], b[1]])
        };
        let v: i64 = match ty {
            0 => read_bytes(r, 1, len)?[0] as i64,
            1 => read_bytes(r, 1, len)?[0] as i8 as i64,
            2 => u16::from_le_bytes(two(r)?) as i64,
            3 => i16::from_le_bytes(two(r)?) as i64,
            4 => u32_le(r)? as i64,
            _ => u32_le(r)? as i32 as i64,
        };
        // Negative: candle takes its default alignment, as for a value of another type.
        found = (v >= 0).then_some(v as u64);
    }
    Ok(found)
}

fn skip_value(r: &mut BufReader<File>, ty: u32, wide: bool, len: u64, depth: u32) -> std::result::Result<(), String> {
    let count = |r: &mut BufReader<File>| if wide { u64_le(r) } else { u32_le(r).map(u64::from) };
    let fixed = |ty: u32| match ty {
        0 | 1 | 7 => Some(1u64),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    match ty {
        8 => {
            let n = count(r)?;
            skip(r, n, len)
        }
        9 => {
            if depth > 8 {
                return Err("arrays nested too deep".into());
            }
            let inner = u32_le(r)?;
            let n = count(r)?;
            match fixed(inner) {
                Some(size) => skip(r, n.checked_mul(size).ok_or("an array larger than the file")?, len),
                None => {
                    if n > len {
                        return Err("an array longer than the file".into());
                    }
                    (0..n).try_for_each(|_| skip_value(r, inner, wide, len, depth + 1))
                }
            }
        }
        t => match fixed(t) {
            Some(size) => skip(r, size, len),
            None => Err(format!("unknown metadata value type {t}")),
        },
    }
}

fn read_bytes(r: &mut BufReader<File>, n: u64, len: u64) -> std::result::Result<Vec<u8>, String> {
    let here = r.stream_position().map_err(|e| e.to_string())?;
    if n > len.saturating_sub(here) {
        return Err(format!("a length of {n} bytes runs past the end of the file"));
    }
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn skip(r: &mut BufReader<File>, n: u64, len: u64) -> std::result::Result<(), String> {
    let here = r.stream_position().map_err(|e| e.to_string())?;
    if n > len.saturating_sub(here) {
        return Err(format!("a length of {n} bytes runs past the end of the file"));
    }
    r.seek_relative(n as i64).map_err(|e| e.to_string())
}

fn u32_le(r: &mut BufReader<File>) -> std::result::Result<u32, String> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|e| e.to_string())?;
    Ok(u32::from_le_bytes(b))
}

fn u64_le(r: &mut BufReader<File>) -> std::result::Result<u64, String> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(|e| e.to_string())?;
    Ok(u64::from_le_bytes(b))
}
