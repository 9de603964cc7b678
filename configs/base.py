"""Settings shared by every run of the paper (section 3.2 and appendix A).

Not a run by itself: `configs/paper.py:<run>` and the other configs start
from `get_base_config()` and set their data, optimizer, learning rate, sigma
and init, e.g.

    python -m experiments.train --config=configs/paper.py:mnist_sgd_plateau \
        --workdir=runs/fig2

Appendix A: a feedforward ReLU net with 12 hidden layers of 128 units and no
biases, softmax cross-entropy, mini-batches of 32, 3000 iterations, and the
base learning rate decayed by 0.95 every 100 iterations.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """The appendix-A settings; a run's config fills in the rest."""
  config = ml_collections.ConfigDict()
  config.name = "base"
  config.figure = ""  # the paper's figure, e.g. "Fig. 2"
  config.claim_kind = "plateau"  # plateau | plateau_adaptive | no_plateau | adam
  config.seed = 0
  # Seeds trained side by side, vectorized in one program: seed i draws its
  # initialization and batch order from seed + i (experiments.reproduce: 5).
  config.num_seeds = 1

  config.model = ml_collections.ConfigDict()
  config.model.depth = 12  # hidden layers
  config.model.width = 128  # units per hidden layer
  config.model.init_scale = 0.1  # every weight ~ U(-init_scale, init_scale)
  config.model.use_bias = False
  # "mlp" (the paper's net: depth x width), "cnn" or "rnn" (width units);
  # see experiments/models.py.
  config.model.kind = "mlp"
  config.model.activation = "relu"
  config.model.input_shape = ()  # () = flat vectors; (32, 32, 3), (28, 28)...

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd | adagrad | adadelta | adam | rmsprop
  config.optimizer.learning_rate = 0.01  # base lr at step 0
  config.optimizer.decay_steps = 100  # lr(t) = lr * decay_rate**(t/decay_steps)
  config.optimizer.decay_rate = 0.95
  config.optimizer.decay_staircase = False
  config.optimizer.sigma = 100.0  # cubic weight of eq. 8
  # How the CR run gets slope and curvature (all exact; experiments/steps.py):
  # "engine" shares the gradient pass (lrcr.value_grad_and_curvature; Gram
  # matrices after SGD), "lowrank" calls lrcr.lowrank_curvature_fn,
  # "autodiff" forward-over-forward autodiff, "hvp" a Hessian-vector product.
  config.optimizer.curvature = "engine"
  # The engine's batched evaluation of equally shaped layers (same numbers;
  # slower on a 2-core CPU, meant for accelerators: experiments/device_check).
  config.optimizer.stack_layers = False
  # Beyond the paper (section 4's future work): one alpha per step ("global",
  # the paper), per layer ("layer") or per weight ("variable"), and sigma
  # adapted by Kohler & Lucchi's accept/reject rule.
  config.optimizer.granularity = "global"
  config.optimizer.adaptive_sigma = False
  # Exactness traded for speed, both off by default: the curvature
  # on the first `curvature_batch_size` rows of the batch (0 = all), and alpha
  # refreshed every `curvature_every` steps (1 = every step).
  config.optimizer.curvature_batch_size = 0
  config.optimizer.curvature_every = 1
  # Section 3.1 for SGD: "batch" (alpha from the batch-mean slope and
  # curvature, the paper), "mean_alpha" (E[alpha] E[g]) or "mean_alpha_g"
  # (E[alpha g]); per-sample alphas, the options the paper found too noisy.
  config.optimizer.averaging = "batch"

  config.data = ml_collections.ConfigDict()
  config.data.name = "mnist"  # mnist | cifar10
  config.data.source = "auto"  # auto | tfds | files | mnist_5k (input_pipeline)
  config.data.path = ""  # TFDS data_dir or files directory; "" for none
  config.data.split = "train"

  config.training = ml_collections.ConfigDict()
  config.training.num_steps = 3000
  config.training.batch_size = 32
  config.training.chunk_size = 100  # steps per jitted lax.scan and checkpoint
  config.training.scan_unroll = 1  # lax.scan unroll (True: the whole chunk)
  config.training.nonfinite = "skip"  # skip | stop
  # Data parallelism: 0 = every local device (batch split over a "data" mesh
  # axis, parameters replicated), 1 = a single device.
  config.training.num_devices = 0
  config.training.progress = True  # tqdm progress bar on stderr
  config.training.inject_nan_at_step = -1  # testing only: NaN inputs there
  return config
