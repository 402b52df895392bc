"""`python -m tfx.sample --workdir=W`: images from prompts, captions from images.

  --prompt "a red circle" --num 8 --out DIR   PNGs + grid.png
  --prompts_file FILE --out DIR               PNGs + DIR/manifest.jsonl
  --image A.png [B.jpg ...]                   one JSON line {"image", "caption"} each
  --edit A.png --instruction TEXT --out DIR   --num edited images + grid.png (source first)
  --interleaved PROMPT.json --out DIR         continues a document of text and images:
      PROMPT.json is a list of {"text": "..."} / {"image": "a.png"} (paths relative to the file);
      DIR/document.jsonl gets the prompt's and the new pieces in order, new images as DIR/NNNNN.png
  --best_of K                                 draws K images per caption, keeps the one the model reads
                                              likeliest as its caption (K times the denoising)
  --mesh fsdp=8 (or data=2,fsdp=2,tensor=2)   params sharded over a device mesh as in training
  --coordinator_address H:P --num_processes N --process_id I   several processes as one program
                                              (as tfx.train); only process 0 writes or prints
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from tfx import arguments, distributed

USAGE_ERROR = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses and checks the flags; misuse exits with code 2 and a one-line message."""
  p = arguments.ArgumentParser(prog="python -m tfx.sample", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
  mode = p.add_mutually_exclusive_group(required=True)
  mode.add_argument("--prompt", help="one caption to draw --num images for")
  mode.add_argument("--prompts_file", help="text file, one caption per line")
  mode.add_argument("--image", nargs="+", metavar="PATH", help="PNG/JPEG images to caption")
  mode.add_argument("--edit", metavar="PATH", help="PNG/JPEG image to edit by --instruction")
  mode.add_argument("--interleaved", metavar="PROMPT.json", help="a prompt of text and images to continue")
  p.add_argument("--instruction", help="with --edit: what to change, e.g. 'make the red circle blue'")
  p.add_argument("--num", type=int, default=4, help="images per --prompt or --edit")
  p.add_argument("--out", help="output folder (required with --prompt/--prompts_file/--edit/--interleaved)")
  p.add_argument("--seed", type=int, default=0, help="noise / sampling seed")
  p.add_argument("--steps", type=int, default=None, help="denoising steps (default: config)")
  p.add_argument("--cfg_scale", type=float, default=None, help="guidance scale (default: config)")
  p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None, help="default: config")
  arguments.add_cfg_interval_flag(p)
  arguments.add_clip_x0_flag(p)
  arguments.add_best_of_flag(p)
  p.add_argument("--temperature", type=float, default=0.0, help="caption sampling; 0 = greedy")
  p.add_argument("--max_tokens", type=int, default=32, help="longest caption (--interleaved: all text) in tokens")
  p.add_argument("--max_images", type=int, default=1, help="--interleaved: most images to generate")
  p.add_argument("--batch_size", type=int, default=16, help="prompts or images per device batch")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--no_ema", action="store_true", help="use raw params even if EMA params exist")
  p.add_argument("--mesh", type=_mesh_flag, default=None, metavar="AXIS=SIZE,...",
                 help="device mesh over data/fsdp/tensor (axes not named are 1, one may be -1 = the rest), "
                      "params sharded as in training; default: the first device only, or fsdp over "
                      "every device of several processes")
  distributed.add_argparse_flags(p)
  args = p.parse_args(argv)
  try:
    distributed.check_flags(args.coordinator_address, args.num_processes, args.process_id)
  except distributed.DistributedError as e:
    p.exit(USAGE_ERROR, f"tfx.sample: error: {e}\n")  # one line, as tfx.train says it
  if args.prompt is not None and not args.prompt.strip():
    p.error("--prompt is empty; give a caption such as --prompt 'a red circle'")
  if args.image is None and not args.out:
    p.error("--out DIR is required with --prompt / --prompts_file / --edit / --interleaved")
  if (args.edit is None) != (args.instruction is None) or (args.instruction is not None
                                                            and not args.instruction.strip()):
    p.error("--edit IMAGE and a non-empty --instruction TEXT go together")
  for name in ("num", "batch_size", "max_tokens"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.steps is not None and args.steps < 1:
    p.error(f"--steps must be >= 1, got {args.steps}")
  if not args.temperature >= 0:
    p.error(f"--temperature must be >= 0, got {args.temperature}")
  if args.cfg_scale is not None and not args.cfg_scale >= 0:
    p.error(f"--cfg_scale must be >= 0, got {args.cfg_scale}")
  if args.step is not None and args.step < 0:
    p.error(f"--step must be >= 0, got {args.step}")
  arguments.check_cfg_interval_flag(p, args.cfg_interval)
  arguments.check_clip_x0_flag(p, args.clip_x0)
  arguments.check_best_of_flag(p, args.best_of)
  if args.max_images < 0:
    p.error(f"--max_images must be >= 0, got {args.max_images}")
  return args


def _mesh_flag(text: str):
  from tfx import restore
  try:
    return restore.parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


class UsageError(Exception):
  """Bad input found after parsing: reported in one line, exit code 2."""


def read_prompts(path: str) -> list[str]:
  """Non-blank lines of a prompts file."""
  try:
    with open(path, encoding="utf-8") as f:
      prompts = [line.strip() for line in f]
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"cannot read --prompts_file {path}: {e}") from None
  prompts = [q for q in prompts if q]
  if not prompts:
    raise UsageError(f"--prompts_file {path} holds no prompt (every line is blank)")
  return prompts


def _output_names(count: int, manifest: bool) -> list[str]:
  """The files a text-to-image run writes into --out."""
  return [f"{i:05d}.png" for i in range(count)] + (["manifest.jsonl"] if manifest else ["grid.png"])


def _check_out(out: str, names: list[str]) -> None:
  """Refuses an --out that is a file or already holds any file this run would write."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f"--out {out} exists and is not a folder")
  taken = [n for n in names if os.path.exists(os.path.join(out, n))]
  if taken:
    raise UsageError(f"--out {out} already holds {taken[0]}; choose an empty or new folder")


def _save_png(path: str, image_HW3: np.ndarray) -> None:
  from PIL import Image
  Image.fromarray(image_HW3).save(path)


def _log(msg: str) -> None:
  if distributed.is_chief():
    print(msg, file=sys.stderr, flush=True)


def _text_to_image(gen, prompts: list[str], args, out: str, manifest: bool) -> None:
  from tfx import generate
  names = _output_names(len(prompts), manifest)
  limit = gen.config.data.max_caption_tokens
  cut = sum(len(gen.tokenizer.encode(p)) > limit for p in prompts)
  if cut:
    _log(f"{cut} prompt(s) cut to data.max_caption_tokens={limit} tokens, as training cuts captions")
  start = time.time()
  progress = lambda done, total: _log(f"images {done}/{total}  ({time.time() - start:.1f}s)")
  images = gen.text_to_image(prompts, seed=args.seed, steps=args.steps, cfg_scale=args.cfg_scale,
                             sampler=args.sampler, batch_size=args.batch_size, progress=progress)
  if not distributed.is_chief():
    return
  os.makedirs(out, exist_ok=True)
  _check_out(out, names)  # again: another run may have written there meanwhile
  for name, image in zip(names, images):  # the last name (manifest or grid) is written below
    _save_png(os.path.join(out, name), image)
  if manifest:
    with open(os.path.join(out, "manifest.jsonl"), "w", encoding="utf-8") as f:
      for prompt, name in zip(prompts, names):
        f.write(json.dumps({"prompt": prompt, "file": name}) + "\n")
  else:
    _save_png(os.path.join(out, "grid.png"), generate.image_grid(images))
  _log(f"wrote {len(prompts)} images to {out}")


def read_images(paths: list[str]) -> list[np.ndarray]:
  """uint8 [H, W, 3] per path; the first unreadable one is a UsageError."""
  from tfx import generate
  try:
    return [generate.load_image(path) for path in paths]
  except generate.ImageReadError as e:
    raise UsageError(str(e)) from None


def _caption(gen, paths: list[str], images: list[np.ndarray], args) -> None:
  captions = gen.caption(images, seed=args.seed, temperature=args.temperature, max_tokens=args.max_tokens,
                         batch_size=args.batch_size)
  if not distributed.is_chief():
    return
  for path, caption in zip(paths, captions):
    print(json.dumps({"image": path, "caption": caption}), flush=True)


def _edit(gen, image: np.ndarray, args, out: str) -> None:
  from tfx import generate
  from tfx.eval import edits
  names = _output_names(args.num, manifest=False)
  start = time.time()
  progress = lambda done, total: _log(f"edits {done}/{total}  ({time.time() - start:.1f}s)")
  images = edits.edit_images(gen, [image] * args.num, [args.instruction] * args.num, seed=args.seed,
                             steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler, progress=progress)
  if not distributed.is_chief():
    return
  os.makedirs(out, exist_ok=True)
  _check_out(out, names)
  for name, edited in zip(names, images):
    _save_png(os.path.join(out, name), edited)
  source = gen.patches_to_images(gen.image_patches([image]))   # the source as the model sees it
  _save_png(os.path.join(out, "grid.png"), generate.image_grid(np.concatenate([source, images])))
  _log(f"wrote {args.num} edited images to {out}")


DOCUMENT = "document.jsonl"


def read_interleaved(path: str) -> list[dict]:
  """The pieces of an --interleaved prompt file, image paths resolved and images read."""
  try:
    with open(path, encoding="utf-8") as f:
      pieces = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UsageError(f"cannot read --interleaved {path}: {e}") from None
  if not isinstance(pieces, list) or not pieces:
    raise UsageError(f'--interleaved {path} must hold a non-empty JSON list of {{"text": ...}} / {{"image": ...}}')
  out = []
  for i, piece in enumerate(pieces):
    if not (isinstance(piece, dict) and len(piece) == 1 and isinstance(piece.get("text", piece.get("image")), str)):
      raise UsageError(f'--interleaved {path}: piece {i} is not {{"text": "..."}} or {{"image": "path"}}: {piece!r}')
    if "image" in piece:
      image_path = os.path.join(os.path.dirname(path), piece["image"])
      out.append({"image": read_images([image_path])[0], "path": image_path})
    else:
      out.append(piece)
  if not any(p.get("text", "x") for p in out):
    raise UsageError(f"--interleaved {path}: every piece is empty text")
  return out


def _interleaved(gen, pieces: list[dict], args) -> None:
  out = args.out
  new = gen.generate([{k: p[k] for k in ("text", "image") if k in p} for p in pieces], seed=args.seed,
                     max_tokens=args.max_tokens, max_images=args.max_images, temperature=args.temperature,
                     steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler)
  if not distributed.is_chief():
    return
  os.makedirs(out, exist_ok=True)
  names = [f"{i:05d}.png" for i in range(sum(not isinstance(x, str) for x in new))]
  _check_out(out, names + [DOCUMENT])
  lines = [{"text": p["text"]} if "text" in p else {"image": p["path"]} for p in pieces]
  lines = [dict(line, generated=False) for line in lines]
  for x in new:
    if isinstance(x, str):
      lines.append({"text": x, "generated": True})
    else:
      name = names[sum("image" in line and line["generated"] for line in lines)]
      _save_png(os.path.join(out, name), x)
      lines.append({"image": name, "generated": True})
  with open(os.path.join(out, DOCUMENT), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  _log(f"wrote {len(new)} new pieces ({len(names)} images) to {os.path.join(out, DOCUMENT)}")


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's notices about read-only restores are noise here
  try:
    # every check that needs no model runs before the (slow) checkpoint restore; every process
    # reads the inputs (all run the same program), only process 0 checks --out, which it alone writes
    if args.image:
      images = read_images(args.image)
    elif args.edit:
      source = read_images([args.edit])[0]
    elif args.interleaved:
      pieces = read_interleaved(args.interleaved)
    else:
      prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt] * args.num
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if args.image is None:
      if args.edit:
        names = _output_names(args.num, manifest=False)
      elif args.interleaved:
        names = [DOCUMENT]
      else:
        names = _output_names(len(prompts), manifest=bool(args.prompts_file))
      refused = None
      if distributed.is_chief():
        try:
          _check_out(args.out, names)
        except UsageError as e:
          refused = e
      if distributed.chief_says(refused is not None):
        raise refused or UsageError(f"process 0 refused --out {args.out} (its error says why)")
    import jax
    from tfx import autoencoder, generate, mesh as mesh_lib, restore
    try:
      mesh = restore.cli_mesh(args.mesh)
    except mesh_lib.MeshError as e:
      raise UsageError(str(e)) from None
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      try:
        config, model = restore.restore_model(args.workdir, args.step, ema=not args.no_ema, mesh=mesh)
      except restore.RestoreError as e:
        raise UsageError(str(e)) from None
      if args.steps is not None and args.steps > config.diffusion.num_timesteps:
        raise UsageError(f"--steps {args.steps} exceeds the {config.diffusion.num_timesteps} training timesteps")
      if args.cfg_interval is not None:
        config.diffusion.cfg_interval = tuple(args.cfg_interval)
      if args.clip_x0 is not None:
        config.diffusion.clip_x0 = args.clip_x0
      if args.best_of is not None:
        config.diffusion.best_of = args.best_of
      if args.image and args.max_tokens > config.seq_len:
        raise UsageError(f"--max_tokens {args.max_tokens} exceeds the model's context (seq_len {config.seq_len})")
      try:
        gen = generate.Generator(config, model)
      except (autoencoder.AutoencoderError, FileNotFoundError) as e:
        raise UsageError(f"cannot set up generation for {args.workdir}: {e}") from None
      try:
        if args.image:
          _caption(gen, args.image, images, args)
        elif args.edit:
          _edit(gen, source, args, args.out)
        elif args.interleaved:
          _interleaved(gen, pieces, args)
        else:
          _text_to_image(gen, prompts, args, args.out, manifest=bool(args.prompts_file))
      except generate.PromptTooLongError as e:
        raise UsageError(str(e)) from None
  except UsageError as e:
    print(f"tfx.sample: error: {e}", file=sys.stderr)
    return USAGE_ERROR
  return 0


if __name__ == "__main__":
  sys.exit(main())
