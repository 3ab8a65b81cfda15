import torch, fnlight, fnlight.optim as fo
from fnlight import distributed
from tests.models import loss_fn, mlp
distributed.init(backend="gloo", timeout_s=60)
rank = distributed.rank()
model = mlp(din=7, dout=5)
opt = fo.adam(1e-2)
a = b = fnlight.TrainState.create(model, opt, seed=0)
s1 = fnlight.make_train_step(model, loss_fn, opt, shard_optimizer_state=True)
s2 = fnlight.make_train_step(model, loss_fn, opt)
g = torch.Generator().manual_seed(100 + rank)
for t in range(50):
    x, y = torch.randn(8, 7, generator=g), torch.randint(0, 5, (8,), generator=g)
    a, _ = s1(a, (x, y)); b, _ = s2(b, (x, y))
    bad = [k for k in a.params if not torch.equal(a.params[k], b.params[k])]
    if bad:
        print(rank, t, bad, [(a.params[k]-b.params[k]).abs().max().item() for k in bad]); break
torch.distributed.destroy_process_group()
