import dataclasses, sys, types
for name, path in [("xax", "xax"), ("xax.core", "xax/core")]:
    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m
cfg = types.ModuleType("xax.core.config")
cfg.field = lambda default, help="": dataclasses.field(default=default)
sys.modules["xax.core.config"] = cfg
import time, jax, jax.numpy as jnp, equinox as eqx, optax
from xax.arch.dit import DiT, dit_config
from xax.arch.unet import UNet, UNetConfig
from xax.arch.diffusion import GaussianSchedule, diffusion_loss, flow_matching_loss, ddim_sample, guided
print(jax.__version__, jax.devices())

def bench(name, model, x, y, loss_kind):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = optax.adamw(1e-4); st = opt.init(params)
    sched = GaussianSchedule.from_name("cosine")
    @jax.jit
    def step(params, st, key):
        def lf(p):
            net = eqx.combine(jax.tree.map(lambda a: a.astype(jnp.bfloat16), p), static)
            den = lambda xt, t: jax.vmap(net)(xt, t, y)
            return flow_matching_loss(den, x, key) if loss_kind == "flow" else diffusion_loss(den, sched, x, key)
        l, g = jax.value_and_grad(lf)(params)
        u, st = opt.update(g, st, params); return optax.apply_updates(params, u), st, l
    t = time.time(); params, st, l = step(params, st, jax.random.key(0)); l.block_until_ready(); c = time.time() - t
    t = time.time()
    for i in range(20): params, st, l = step(params, st, jax.random.key(i))
    l.block_until_ready(); dt = (time.time() - t) / 20
    print(f"{name}: compile {c:.1f}s step {dt*1000:.1f} ms, {x.shape[0]/dt:.0f} img/s, loss {float(l):.4f}", flush=True)
    return params, static

for impl in ["cudnn", "xla", None]:
    x = jax.random.normal(jax.random.key(1), (256, 4, 32, 32), jnp.bfloat16); y = jnp.arange(256) % 1000
    bench(f"DiT-B/2 bs256 bf16 flow impl={impl}", DiT(dit_config("DiT-B/2", attention_impl=impl), key=jax.random.key(0)), x, y, "flow")
x = jax.random.normal(jax.random.key(1), (128, 1, 28, 28), jnp.bfloat16); y = jnp.arange(128) % 10
params, static = bench("UNet MNIST bs128 bf16 ddpm", UNet(UNetConfig(), key=jax.random.key(0)), x, y, "ddpm")
net = jax.vmap(eqx.combine(params, static))
sched = GaussianSchedule.from_name("cosine")
samp = jax.jit(lambda n, lab: ddim_sample(guided(net, lab, 10, 3.0), sched, n, jax.random.key(0), 50, clip_x0=1.0))
n = jax.random.normal(jax.random.key(3), (100, 1, 28, 28)); lab = jnp.repeat(jnp.arange(10), 10)
t = time.time(); s = samp(n, lab).block_until_ready(); c = time.time() - t
t = time.time(); s = samp(n, lab).block_until_ready(); print(f"DDIM-50 CFG 100 samples: compile+run {c:.1f}s, run {time.time()-t:.2f}s", s.shape, s.dtype)
