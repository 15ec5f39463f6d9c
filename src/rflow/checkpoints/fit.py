"""Whether a pipeline's parts fit each other: transformer, VAE (or latent codec) and text encoders.

Each part can be a valid checkpoint on its own and still not go with the others (a FLUX.1 transformer
with an SD VAE, rflow-tiny's transformer with a codec of another factor, T5 of another width). Checked
from the parts' configs before any sampling, so a mismatch is one :class:`~rflow.errors.UserError`
instead of a shape error deep inside the first denoising step.
"""

from __future__ import annotations

from ..errors import UserError
from ..models.flux import FluxConfig


def _latent_channels(vae) -> int | None:
    """Latent channels of an :class:`~rflow.models.vae.AutoEncoder` or a parameter-free codec."""
    n = getattr(vae, "latent_channels", None)
    if n is None:
        n = getattr(getattr(vae, "config", None), "z_channels", None)
    return int(n) if n is not None else None


def _width(model, *names: str) -> int | None:
    cfg = getattr(model, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def check_parts_fit(transformer_config, vae, text_encoders, *, where: str) -> None:
    """Raise a :class:`UserError` (prefixed with ``where``) if the parts of a pipeline do not fit.

    ``transformer_config`` is a :class:`FluxConfig` (or a model carrying one as ``.config``); ``vae`` an
    AutoEncoder or codec with ``latent_channels``; ``text_encoders`` a
    :class:`~rflow.models.text.TextEncoders`. Either of the last two may be ``None`` to skip its check.

    The transformer reads and writes 2×2 patches of latents, so ``in_channels`` and ``out_channels`` must
    be 4 × the VAE's latent channels; ``context_in_dim`` must be the width of the T5 sequence and
    ``vec_in_dim`` the width of the pooled CLIP vector (``pooler_output``, CLIP's ``hidden_size``) that
    ``TextEncoders.encode`` returns.
    """
    cfg = transformer_config if isinstance(transformer_config, FluxConfig) else transformer_config.config
    if vae is not None:
        latent = _latent_channels(vae)
        for n, verb, what, vae_verb in ((cfg.in_channels, "takes", "input", "gives"),
                                        (cfg.out_channels, "gives", "output", "takes")):
            if n % 4:
                raise UserError(f"{where}: the transformer {verb} {n} {what} channels, not a multiple of 4 "
                                "(2×2 patches of latents)")
            if latent is not None and n != 4 * latent:
                raise UserError(f"{where}: the transformer {verb} {n} {what} channels ({n // 4} latent channels), "
                                f"but the VAE {vae_verb} {latent}")
    if text_encoders is not None:
        t5 = _width(getattr(text_encoders, "t5", None), "d_model", "hidden_size")
        if t5 is not None and t5 != cfg.context_in_dim:
            raise UserError(f"{where}: the transformer takes {cfg.context_in_dim}-wide T5 text embeddings "
                            f"(context_in_dim), but the T5 encoder gives {t5}")
        clip = _width(getattr(text_encoders, "clip", None), "hidden_size")
        if clip is not None and clip != cfg.vec_in_dim:
            raise UserError(f"{where}: the transformer takes {cfg.vec_in_dim}-wide pooled CLIP vectors "
                            f"(vec_in_dim), but the CLIP encoder gives {clip}")
