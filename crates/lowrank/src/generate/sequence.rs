//! One sequence being decoded: the rules every front end shares.
//!
//! A [`Sequence`] owns its KV cache, sampler, stop strings and streamed text, and checks its prompt
//! once. A driver feeds [`Sequence::input`] through the model (with [`forward`], any number of
//! sequences in one pass) and hands each sequence its logits row: [`Sequence::step`] samples, stops
//! at an eos, a stop string or a length limit, and returns the text that became final. `generate`,
//! [`greedy_batch`](super::greedy_batch) and the serving engine are such drivers, so they agree on
//! every rule, the context limit included: prompt and generated tokens together never exceed the
//! model's context (`max_position_embeddings`), as OpenAI's API counts a request.

use crate::adapter::ActiveAdapter;
use crate::model::{KvCache, Model, SeqInput};
use crate::tokenizer::{TextStream, Tokenizer};
use crate::{Error, Result};

use super::{FinishReason, GenerateOptions, Sampler, StopStrings};

/// A prompt being continued.
pub struct Sequence<'t> {
    adapters: Vec<ActiveAdapter>,
    cache: KvCache,
    sampler: Sampler,
    stops: StopStrings,
    stream: TextStream<'t>,
    eos: &'t [u32],
    /// Tokens to feed next: the prompt, then the last sampled token.
    input: Vec<u32>,
    prompt_len: usize,
    /// Generated ids, eos excluded.
    tokens: Vec<u32>,
    max_new_tokens: usize,
    context: usize,
    finish: Option<FinishReason>,
}

/// What one [`Sequence::step`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Text that became final (empty while a character or a possible stop string is incomplete).
    pub text: String,
    /// Set when the sequence has ended.
    pub finish: Option<FinishReason>,
}

impl<'t> Sequence<'t> {
    /// A sequence continuing `prompt` with `adapters` on `model`. The prompt must be non-empty,
    /// shorter than the model's context (room for one new token) and within its vocabulary; `max_new_tokens = 0` gives
    /// a sequence that is finished at once.
    pub fn new(
        model: &Model,
        tokenizer: &'t Tokenizer,
        adapters: &[ActiveAdapter],
        prompt: &[u32],
        options: &GenerateOptions,
    ) -> Result<Self> {
        let context = model.config().max_position_embeddings;
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if prompt.len() >= context {
            return Err(Error::PromptTooLong { tokens: prompt.len(), context });
        }
        // Checked here, at admission: a bad id in one row must not fail a whole batch's forward.
        let vocab = model.config().vocab_size;
        if let Some((position, &id)) = prompt.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(Error::TokenOutOfRange { id, position, vocab });
        }
        Ok(Sequence {
            adapters: adapters.to_vec(),
            cache: model.new_cache(),
            sampler: Sampler::new(options.sampling.clone())?,
            stops: StopStrings::new(options.stop.clone()),
            stream: TextStream::new(tokenizer),
            eos: tokenizer.eos_token_ids(),
            input: prompt.to_vec(),
            prompt_len: prompt.len(),
            tokens: Vec::new(),
            max_new_tokens: options.max_new_tokens,
            context,
            finish: (options.max_new_tokens == 0).then_some(FinishReason::Length),
        })
    }

    /// The tokens to feed next (`[T]`: the whole prompt first, then one token a step).
    pub fn input(&self) -> &[u32] {
        &self.input
    }

    /// The adapters this sequence runs with.
    pub fn adapters(&self) -> &[ActiveAdapter] {
        &self.adapters
    }

    /// Prompt length in tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The generated ids so far (eos excluded).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Why the sequence ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Samples the next token from `logits` (`[V]`, the model's output for [`Sequence::input`]'s
    /// last position) and applies the stop rules. Calling it on a finished sequence is an error.
    pub fn step(&mut self, logits: &[f32]) -> Result<Step> {
        if self.finish.is_some() {
            return Err(Error::Batch("the sequence has already finished".into()));
        }
        let next = self.sampler.sample(logits)?;
        let mut text = String::new();
        let finish = if self.eos.contains(&next) {
            Some(FinishReason::Eos)
        } else {
            self.tokens.push(next);
            self.input = vec![next];
            let out = self.stops.push(&self.stream.push(next)?);
            text = out.text;
            if out.stopped {
                Some(FinishReason::Stop)
            } else if self.tokens.len() >= self.max_new_tokens || self.prompt_len + self.tokens.len() >= self.context {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        if matches!(finish, Some(FinishReason::Eos | FinishReason::Length)) {
            // Text held back for a possible stop string or an incomplete character is final now.
            let out = self.stops.push(&self.stream.finish()?);
            text.push_str(&out.text);
            if !out.stopped {
                text.push_str(&self.stops.flush());
            }
        }
        self.finish = finish;
        Ok(Step { text, finish })
    }
}

/// One forward pass for `seqs` (none finished), each with its own adapters and cache: the logits
/// row of each one's next token, `[B][V]`.
pub fn forward(model: &Model, seqs: &mut [&mut Sequence]) -> Result<Vec<Vec<f32>>> {
    let mut caches: Vec<KvCache> = seqs.iter_mut().map(|s| std::mem::take(&mut s.cache)).collect();
    let inputs: Vec<SeqInput> = seqs.iter().map(|s| SeqInput { tokens: &s.input, adapters: &s.adapters }).collect();
    let logits = model.forward_last(&inputs, Some(&mut caches)).and_then(|l| Ok(l.to_vec2::<f32>()?));
    drop(inputs);
    for (s, c) in seqs.iter_mut().zip(caches) {
        s.cache = c;
    }
    logits
}
