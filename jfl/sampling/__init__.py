"""Inference: the rectified-flow image sampler (`flow`) and autoregressive text decoding (`text`)."""

from jfl.sampling.flow import FlowPrompt, noise_for_seeds, prepare_prompt, sample_latents, velocity
from jfl.sampling.text import answer_tokens, decode, sample_token

__all__ = ["FlowPrompt", "answer_tokens", "decode", "noise_for_seeds", "prepare_prompt", "sample_latents",
           "sample_token", "velocity"]
