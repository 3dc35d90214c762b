"""`zimage-mlx convert` (also `python -m zimage_mlx.convert`): the options translated into loading.convert calls."""

from __future__ import annotations

import click

from ..loading.convert import check_output, convert, convert_controlnet
from ..loading.quantize import GROUP_SIZES
from .command import Command, run_guarded
from .options import quantize_option


def _bits(quantize, transformer_bits, text_encoder_bits) -> dict:
    if quantize == "auto":
        raise click.UsageError("--quantize auto is decided at load time; give 4, 8, none or transformer=4,...")
    bits = dict(quantize or {"transformer": None, "text_encoder": None})
    for name, value in (("transformer", transformer_bits), ("text_encoder", text_encoder_bits)):
        if value is not None:
            bits[name] = quantize_option(None, None, {name: value})[name]
    return bits


def _check_sources(source, transformer, text_encoder, vae, transformer_config, vae_config) -> None:
    singles = [f for f in (transformer, text_encoder, vae) if f]
    if source is None and not singles:
        raise click.UsageError("give SOURCE or --transformer/--text-encoder/--vae files")
    if source is not None and singles:
        raise click.UsageError("give either SOURCE or single files (--transformer/--text-encoder/--vae), not both")
    if source is None and len(singles) < 3:
        missing = [f"--{k}" for k, v in (("transformer", transformer), ("text-encoder", text_encoder), ("vae", vae))
                   if not v]
        raise click.UsageError(f"single-file conversion needs {', '.join(missing)} too")
    if source is not None and (transformer_config or vae_config):
        raise click.UsageError("--transformer-config/--vae-config are for single files; SOURCE has its configs")


@click.command("convert", cls=Command)
@click.argument("source", required=False)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Destination directory.")
@click.option("--transformer", help="ComfyUI/single-file transformer (path or hub file owner/repo/file).")
@click.option("--text-encoder", help="Single-file Qwen3 text encoder (path or hub file owner/repo/file).")
@click.option("--vae", help="Single-file FLUX VAE, ae.safetensors (path or hub file owner/repo/file).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), help="Directory with tokenizer.json.")
@click.option("--transformer-config", type=click.Path(exists=True, dir_okay=False),
              help="config.json for a single-file transformer (default: inferred from its shapes).")
@click.option("--vae-config", type=click.Path(exists=True, dir_okay=False),
              help="config.json for a single-file VAE (default: inferred from its shapes).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--quantize", "-q", default=None, callback=quantize_option,
              help="4, 8, none, or per model: transformer=4,text_encoder=8 (the VAE stays float).")
@click.option("--transformer-bits", default=None, help="Bits for the transformer only (4, 8, none).")
@click.option("--text-encoder-bits", default=None, help="Bits for the text encoder only (4, 8, none).")
@click.option("--group-size", type=click.Choice([str(g) for g in GROUP_SIZES]), default="64", show_default=True)
@click.option("--revision", default=None, help="Hub revision (with a hub id).")
@click.option("--variant", type=click.Choice(["turbo", "base"]), default=None,
              help="Model family (sets default steps/guidance) [default: detected; turbo for single files].")
@click.option("--controlnet", default=None,
              help="Convert a ControlNet Union (file or diffusers directory) alone; bits from --quantize.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier conversion at the destination.")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks on errors.")
def convert_command(source, output, transformer, text_encoder, vae, tokenizer, transformer_config, vae_config, dtype,
                    quantize, transformer_bits, text_encoder_bits, group_size, revision, variant, controlnet,
                    overwrite, verbose):
    """Convert SOURCE (hub id or Hugging Face-layout directory), or --transformer/--text-encoder/--vae single
    files, into a zimage_mlx (MLX) directory that loads with no key mapping."""
    bits = _bits(quantize, transformer_bits, text_encoder_bits)
    if controlnet is not None:
        if source is not None or transformer or text_encoder or vae:
            raise click.UsageError("--controlnet converts a ControlNet alone: no SOURCE or model files with it")
        run_guarded(lambda: convert_controlnet(output, controlnet, dtype=dtype, bits=bits.get("transformer"),
                                               group_size=int(group_size), overwrite=overwrite), verbose)
        return
    _check_sources(source, transformer, text_encoder, vae, transformer_config, vae_config)
    try:
        check_output(output, overwrite)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    run_guarded(lambda: convert(output, source, transformer=transformer, text_encoder=text_encoder, vae=vae,
                                tokenizer=tokenizer, transformer_config=transformer_config, vae_config=vae_config,
                                dtype=dtype, quantize=bits, group_size=int(group_size), overwrite=overwrite,
                                revision=revision, variant=variant), verbose)
