"""Memory and speed options of every pipeline, under diffusers' method names, with plain torch hooks.

- `enable_attention_slicing`, `fuse_qkv_projections`: delegated to the models (see models/attention.py);
  `enable_vae_slicing`, `enable_vae_tiling`: delegated to the VAE. Slicing and fusing leave the output as it is;
  tiling changes it near the tile seams.
- `enable_model_cpu_offload`: the models live on the CPU and each moves whole to the accelerator when it is
  called, sending the one there before back: one model's weights on the accelerator at a time.
- `enable_sequential_cpu_offload`: every layer's weights move to the accelerator for that layer's call only:
  the least accelerator memory, and the slowest.
- `enable_channels_last`, `enable_torch_compile`: opt-in speed options (compile changes results slightly).
- `fast_dtype`: the dtype the command line picks with `--dtype auto` (the library's default stays float32).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
from torch import nn

# ---- dtypes ---------------------------------------------------------------------------------------------------


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX); probed when called."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def fast_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA (the SDXL pipelines decode in float32 where the VAE's config says `force_upcast`), bfloat16
    on CPUs with native bfloat16, else float32. Both half types change the image slightly against float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_supports_bfloat16():
        return torch.bfloat16
    return torch.float32


def accelerator_device(gpu_id: int | None, device: torch.device | str | None) -> torch.device:
    """Where offloaded models run: `device` (or the available accelerator), with `gpu_id` as its index."""
    if device is None:
        kinds = [getattr(torch, kind, None) for kind in ("cuda", "xpu", "mps")]
        found = [kind for kind, module in zip(("cuda", "xpu", "mps"), kinds) if module and module.is_available()]
        if not found:
            raise ValueError(
                "CPU offload needs an accelerator (CUDA, XPU or MPS) and none was found; pass device='cpu' to run the "
                "offload mechanics on the CPU (no memory is saved), or call pipe.to('cpu') instead"
            )
        device = found[0]
    device = torch.device(device)
    if gpu_id is not None and device.index is not None:
        raise ValueError(f"give the accelerator index once: gpu_id={gpu_id} and device={device} both name one")
    if device.type == "cpu":
        return device
    return torch.device(device.type, gpu_id if gpu_id is not None else (device.index or 0))


# ---- offload hooks -----------------------------------------------------------------------------------------------


class ModelOffload:
    """Moves a whole model to `device` when it (or one of its direct children) is called; the model that was there
    goes back to the CPU. `onloads` records the names of the models moved, most recent last."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current: nn.Module | None = None
        self.handles: list = []
        self.onloads: deque[str] = deque(maxlen=64)

    def attach(self, name: str, model: nn.Module) -> None:
        # children too: a VAE is called through `decode`, which calls its children, not its `forward`
        def onload(module: nn.Module, args: tuple) -> None:
            self.onload(name, model)

        for module in (model, *model.children()):
            self.handles.append(module.register_forward_pre_hook(onload))

    def onload(self, name: str, model: nn.Module) -> None:
        if self.current is model:
            return
        self.offload()
        model.to(self.device)
        self.current = model
        self.onloads.append(name)

    def offload(self) -> None:
        if self.current is not None:
            self.current.to("cpu")
            self.current = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers that `module` itself holds (not its children's) to `device`, in place."""
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in module.named_buffers(recurse=False):
        module._buffers[name] = buffer.to(device)


class SequentialOffload:
    """Moves each layer's own weights to `device` just before the layer runs and back to the CPU right after.
    `onloads` counts the layer calls that moved weights."""

    def __init__(self, device: torch.device):
        self.device = device
        self.handles: list = []
        self.onloads = 0

    def attach(self, name: str, model: nn.Module) -> None:
        for module in model.modules():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if not own:
                continue
            self.handles.append(module.register_forward_pre_hook(self.before))
            self.handles.append(module.register_forward_hook(self.after))

    def before(self, module: nn.Module, args: tuple) -> None:
        self.onloads += 1
        _move_own_tensors(module, self.device)

    def after(self, module: nn.Module, args: tuple, output) -> None:
        _move_own_tensors(module, torch.device("cpu"))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# ---- the pipeline methods ------------------------------------------------------------------------------------------


class MemoryOptionsMixin:
    """The memory and speed switches of a pipeline (diffusers' names). Needs `components` and `to()`."""

    _exclude_from_cpu_offload: tuple[str, ...] = ("safety_checker",)  # small, called once: kept on the device
    _offload: ModelOffload | SequentialOffload | None = None
    _offload_device: torch.device | None = None

    def _model_components(self) -> Iterable[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.components.items() if isinstance(m, nn.Module)]

    # -- attention and VAE ---------------------------------------------------------------------------------------

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Compute the UNet's attention a few heads at a time ("auto": half of them, "max": one, or an int).
        Same output; on CPU, PyTorch's attention kernel already needs little memory, so this rarely helps."""
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        self.set_attention_slice(None)

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        for _, model in self._model_components():
            if hasattr(model, "set_attention_slice"):  # the UNet (not the VAE, as in diffusers)
                model.set_attention_slice(slice_size)

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one image at a time: same output, peak memory of one image."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large images in overlapping, blended tiles: memory of one tile; the output
        differs from the untiled one near the seams."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """One matrix multiply for the attention projections of the UNet and / or the VAE; same output."""
        for model in self._chosen(unet=unet, vae=vae):
            model.fuse_qkv_projections()

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        for model in self._chosen(unet=unet, vae=vae):
            model.unfuse_qkv_projections()

    def _chosen(self, *, unet: bool, vae: bool) -> list[nn.Module]:
        names = [n for n, wanted in (("unet", unet), ("vae", vae)) if wanted]
        return [getattr(self, n) for n in names if isinstance(getattr(self, n, None), nn.Module)]

    # -- speed -------------------------------------------------------------------------------------------------

    def enable_channels_last(self, unet: bool = True, vae: bool = True) -> None:
        """Keep the convolution weights (and so the feature maps) of the UNet and VAE in channels-last layout."""
        for model in self._chosen(unet=unet, vae=vae):
            model.to(memory_format=torch.channels_last)

    def disable_channels_last(self) -> None:
        for model in self._chosen(unet=True, vae=True):
            model.to(memory_format=torch.contiguous_format)

    def enable_torch_compile(self, unet: bool = True, vae: bool = True, **compile_kwargs) -> None:
        """`torch.compile` the UNet and the VAE's encoder and decoder (e.g. `mode="max-autotune"`). The first calls
        are slow (compiling); results can differ slightly from eager ones (fused kernels round differently)."""
        for model in self._chosen(unet=unet, vae=False):
            model.compile(**compile_kwargs)
        if vae and isinstance(getattr(self, "vae", None), nn.Module):
            for part in (self.vae.encoder, self.vae.decoder):
                part.compile(**compile_kwargs)

    def enable_fast(self, *, compile: bool | None = None) -> None:
        """One switch for speed, same pictures up to rounding: fused QKV projections, channels-last UNet and VAE, and
        (by default on CUDA only) the UNet compiled with CUDA graphs (`mode="reduce-overhead"`; inductor caches the
        compiled code between runs). On CPU the default leaves the UNet eager: there the compiled attention kernel
        (`stablepipe.kernels`) is what makes it fast, and torch.compile gained 5 % after 5 minutes of compiling."""
        self.fuse_qkv_projections()
        self.enable_channels_last()
        on_cuda = self.device.type == "cuda"
        if compile if compile is not None else on_cuda:
            self.enable_torch_compile(vae=False, mode="reduce-overhead" if on_cuda else None)

    def enable_step_cache(self, interval: int = 2) -> None:
        """DeepCache-style step caching (`pipelines/step_cache.py`): the whole UNet runs every `interval`-th step,
        the steps between reuse its deep features and run only the outermost level. Faster; the picture changes."""
        from stablepipe.pipelines.step_cache import check_interval

        self._step_cache_interval = check_interval(interval)

    def disable_step_cache(self) -> None:
        self._step_cache_interval = 1

    def disable_torch_compile(self) -> None:
        for _, model in self._model_components():
            for module in model.modules():
                if getattr(module, "_compiled_call_impl", None) is not None:
                    module._compiled_call_impl = None

    # -- offload -----------------------------------------------------------------------------------------------

    @property
    def _execution_device(self) -> torch.device:
        """Where the models compute (the accelerator when offloading); diffusers' name."""
        return self.device

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the models on the CPU; each moves whole to the accelerator when called (the previous one goes
        back). Accelerator memory: the largest model, not all; a little slower than `pipe.to("cuda")`."""
        self._install_offload(ModelOffload, accelerator_device(gpu_id, device))

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Keep every weight on the CPU and move each layer's weights to the accelerator only while that layer
        runs. Accelerator memory: about one layer plus activations; much slower than model offload."""
        self._install_offload(SequentialOffload, accelerator_device(gpu_id, device))

    def _install_offload(self, kind, target: torch.device) -> None:
        """Every model on the CPU with `kind`'s hooks (those excluded from offload go to `target` for good)."""
        self.remove_all_hooks()
        self.to("cpu")
        offload = kind(target)
        for name, model in self._model_components():
            if name in self._exclude_from_cpu_offload:
                model.to(target)
            else:
                offload.attach(name, model)
        self._offload, self._offload_device = offload, target

    def maybe_free_model_hooks(self) -> None:
        """After a call with model offload: send the model still on the accelerator back to the CPU."""
        if isinstance(self._offload, ModelOffload):
            self._offload.offload()

    def remove_all_hooks(self) -> None:
        """Turn offloading off (models stay where they are now)."""
        if self._offload is not None:
            self._offload.remove()
        self._offload, self._offload_device = None, None
