"""The eval hook of the training loop: sample images for fixed prompts, answer fixed questions.

Called every `config.eval.every` steps with the EMA params. Writes `<out_dir>/samples_<step>.png`
(a grid, one image per prompt) and `<out_dir>/answers_<step>.txt`. It needs `jfl.sampling` and a
tokenizer (`config.data.tokenizer`); without them it logs why and does nothing. Failures are logged,
never raised: evaluation must not stop a training run.
"""

import importlib.util
import logging
import os

log = logging.getLogger("jfl.train")


def _split(text: str) -> list[str]:
  return [s.strip() for s in str(text).split(";") if s.strip()]


def run_eval(config, step: int, model_config, params: dict, vae_params, tokenizer, out_dir: str) -> dict | None:
  """Samples and answers with `params` (the model part of the EMA). Returns {"images", "answers"} or None.

  config.eval: prompts ("a;b"), questions ("image_path|question;..."), num_steps, cfg_weight,
  max_new_tokens.
  """
  if importlib.util.find_spec("jfl.sampling") is None:
    log.info("eval at step %d skipped: jfl.sampling is not available", step)
    return None
  if tokenizer is None:
    log.info("eval at step %d skipped: no tokenizer (set --config.data.tokenizer=DIR)", step)
    return None
  try:
    from jfl import chat, pipeline  # pylint: disable=g-import-not-at-top
    from jfl.cli.generate import make_grid  # pylint: disable=g-import-not-at-top
    e = config.eval
    pipe = pipeline.JanusFlowPipeline(model_config, params, vae_params or None, tokenizer, dtype=config.compute_dtype)
    out = {"images": None, "answers": []}
    os.makedirs(out_dir, exist_ok=True)
    prompts = _split(e.prompts)
    if prompts and vae_params:
      images = pipe.generate(prompts, seed=0, num_steps=e.num_steps, cfg_weight=e.cfg_weight)
      out["images"] = os.path.join(out_dir, f"samples_{step:08d}.png")
      make_grid(images).save(out["images"])
    questions = [q.split("|", 1) for q in _split(e.questions)]
    if questions:
      convs = [chat.conversation(path.strip(), q.strip()) for path, q in questions]
      out["answers"] = pipe.chat_batch(convs, max_new_tokens=e.max_new_tokens)
      with open(os.path.join(out_dir, f"answers_{step:08d}.txt"), "w") as f:
        for (path, q), a in zip(questions, out["answers"]):
          f.write(f"[{path.strip()}] {q.strip()}\n-> {a}\n\n")
    return out
  except Exception as err:  # pylint: disable=broad-except
    log.warning("eval at step %d failed: %s: %s", step, type(err).__name__, err)
    return None
