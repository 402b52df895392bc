"""tfx: Transfusion pretraining in JAX/Flax."""
import flax

# Variables carry logical axis names only; tfx/mesh.py turns them into shardings
# when the train state is built, so modules never need a mesh in scope.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
