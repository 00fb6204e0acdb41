"""What "the pipeline is left as it was" means in the tests: a snapshot of everything a call could change."""
import torch


def snapshot(pipe):
    s = pipe.scheduler
    net = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    return dict(
        timesteps=None if s.timesteps is None else s.timesteps.clone(),
        nis=getattr(s, "num_inference_steps", None),
        step_index=getattr(s, "step_index", None),
        config=dict(s.config),
        procs={k: type(v) for k, v in net.attn_processors.items()},
        proc_ids={k: id(v) for k, v in net.attn_processors.items()},
        hooks=(len(net._forward_hooks), len(net._forward_pre_hooks)),
        training=net.training,
        dtype=net.dtype,
        progress=dict(getattr(pipe, "_progress_bar_config", {})),
        grads=sum(p.grad is not None for p in net.parameters()),
        requires_grad=[p.requires_grad for p in net.parameters()][:3],
        weights=sum(p.double().sum().item() for p in net.parameters()),
    )


def assert_same(before, after):
    for k in before:
        if isinstance(before[k], torch.Tensor):
            assert torch.equal(before[k], after[k]), k
        else:
            assert before[k] == after[k], k
