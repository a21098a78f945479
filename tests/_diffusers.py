"""Tiny random configurations of the MoE-DiTs diffusers ships (HiDream-I1, NucleusMoE-Image)
and of Flux, with inputs shaped as their pipelines pass them. Random everywhere: diffusers
zero-initialises some output layers, and a parity test on a zero layer proves nothing."""

import torch

import moedit.models.diffusers_adapters  # noqa: F401  (registers the adapters)

BATCH_DIMS = {"encoder_hidden_states_llama3": 1}  # HiDream stacks the Llama layers first: [layers, B, n, C]
FLUX_BATCH_DIMS = {"img_ids": None, "txt_ids": None}  # Flux's position ids are per token, not per sample


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * (0.5 * param.shape[-1] ** -0.5 if param.dim() > 1
                                                               else 0.1))
    return model.eval()


def tiny_hidream():
    from diffusers.models.transformers.transformer_hidream_image import HiDreamImageTransformer2DModel

    return randomise(HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=4, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=[0, 1, 2]))


def hidream_inputs(batch: int = 2, return_dict: bool = False) -> dict:
    gen = torch.Generator().manual_seed(batch)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=gen), timesteps=torch.arange(batch) * 300 + 50,
                encoder_hidden_states_t5=torch.randn(batch, 5, 8, generator=gen),
                encoder_hidden_states_llama3=torch.randn(3, batch, 6, 4, generator=gen),
                pooled_embeds=torch.randn(batch, 8, generator=gen), return_dict=return_dict)


def tiny_nucleus(**config):
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoEImageTransformer2DModel

    return randomise(NucleusMoEImageTransformer2DModel(**{
        **dict(patch_size=2, in_channels=8, num_layers=3, attention_head_dim=8, num_attention_heads=4,
               num_key_value_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4), dense_moe_strategy="all_moe",
               num_experts=4, moe_intermediate_dim=16, capacity_factors=2.0), **config}))


def nucleus_inputs(batch: int = 2, mask: bool = False, height: int = 4, width: int = 6) -> dict:
    """`mask`: the text of sample i is 5, 3, 4, ... tokens long (the pipeline's padding mask)."""
    gen = torch.Generator().manual_seed(batch)
    inputs = dict(hidden_states=torch.randn(batch, height * width, 8, generator=gen),
                  img_shapes=[(1, height, width)] * batch, encoder_hidden_states=torch.randn(batch, 5, 12, generator=gen),
                  timestep=torch.linspace(900, 300, batch), return_dict=False)
    if mask:
        inputs["encoder_hidden_states_mask"] = torch.arange(5) < torch.tensor([5, 3, 4] * batch)[:batch, None]
    return inputs


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    model = randomise(FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=12, pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4)))
    with torch.no_grad():  # q/k RMS norm weights near one, or the attention logits are ten times too small
        for name, param in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                param.add_(1)
    return model


def flux_inputs(batch: int = 2, height: int = 4, width: int = 6) -> dict:
    gen = torch.Generator().manual_seed(batch)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return dict(hidden_states=torch.randn(batch, height * width, 8, generator=gen),
                encoder_hidden_states=torch.randn(batch, 5, 12, generator=gen),
                pooled_projections=torch.randn(batch, 8, generator=gen), timestep=torch.linspace(0.9, 0.3, batch),
                img_ids=img_ids.flatten(0, 1), txt_ids=torch.zeros(5, 3), return_dict=False)


# -- tiny pipelines: the transformers above, a tiny random VAE, no text encoders (the prompt
#    comes as embeddings, which the pipelines take in place of a prompt)

def _tiny_vae(latent_channels: int):
    """An AutoencoderKL that halves the image side."""
    from diffusers import AutoencoderKL

    return randomise(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                                   shift_factor=0.1))


def hidream_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline

    pipe = HiDreamImagePipeline(FlowMatchEulerDiscreteScheduler(), _tiny_vae(4), *[None] * 8, tiny_hidream())
    pipe.default_sample_size = 8  # HiDream scales every image to this area: 16 x 16 pixels, 8 x 8 latents
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hidream_prompt(seed: int, images: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompt = {}
    for side in ("", "negative_"):
        prompt |= {f"{side}prompt_embeds_t5": torch.randn(images, 5, 8, generator=gen),
                   f"{side}prompt_embeds_llama3": torch.randn(3, images, 6, 4, generator=gen),
                   f"{side}pooled_prompt_embeds": torch.randn(images, 8, generator=gen)}
    return prompt


def nucleus_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage

    vae = randomise(AutoencoderKLQwenImage(base_dim=8, z_dim=2, dim_mult=[1, 1], num_res_blocks=1,
                                           temperal_downsample=[False], latents_mean=[0.0] * 2, latents_std=[1.0] * 2))
    pipe = NucleusMoEImagePipeline(tiny_nucleus(out_channels=2), FlowMatchEulerDiscreteScheduler(), vae, None, None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def nucleus_prompt(seed: int, images: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompt = {}
    for side in ("", "negative_"):
        prompt |= {f"{side}prompt_embeds": torch.randn(images, 5, 12, generator=gen),
                   f"{side}prompt_embeds_mask": torch.ones(images, 5, dtype=torch.bool)}
    return prompt


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), _tiny_vae(2), None, None, None, None, tiny_flux())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_prompt(seed: int, images: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(images, 5, 12, generator=gen),
                pooled_prompt_embeds=torch.randn(images, 8, generator=gen))
