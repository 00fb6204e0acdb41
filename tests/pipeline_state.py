"""What "the pipeline is left as it was" means in the tests: a snapshot of everything a call could change."""
import torch


def snapshot(pipe):
    s = pipe.scheduler
    return dict(timesteps=None if s.timesteps is None else s.timesteps.clone(), nis=s.num_inference_steps,
                step_index=getattr(s, "step_index", None), config=dict(s.config),
                procs={k: type(v) for k, v in pipe.unet.attn_processors.items()},
                proc_ids={k: id(v) for k, v in pipe.unet.attn_processors.items()},
                hooks=(len(pipe.unet._forward_hooks), len(pipe.unet._forward_pre_hooks)),
                training=pipe.unet.training, dtype=pipe.unet.dtype,
                progress=dict(getattr(pipe, "_progress_bar_config", {})),
                grads=sum(p.grad is not None for p in pipe.unet.parameters()),
                requires_grad=[p.requires_grad for p in pipe.unet.parameters()][:3],
                weights=sum(p.double().sum().item() for p in pipe.unet.parameters()))


def assert_same(before, after):
    for k in before:
        if isinstance(before[k], torch.Tensor):
            assert torch.equal(before[k], after[k]), k
        else:
            assert before[k] == after[k], k
