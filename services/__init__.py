"""tomtransfer's services: thin libraries that run the domain core on real engines (Ray Serve, Ray Train,
MLflow), below the pipeline that orders them into stages.

  teacher/    the serving app (teacher and student endpoints, LoRA adapters, exact mode) and its engines
  collector/  fan-out requests into crash-safe sample stores; the teacher dataset
  trainer/    training sets, soft labels, the Ray Train LoRA recipe
  evaluator/  the roles collected by the protocol, scoring, figures, the report, MLflow logging
  common/     below them all: the model store, fingerprints, checks, the console, the local MLflow server
  pipeline/   the stages (the only code that knows about them) and the workflows; cli.py the `tomtransfer` command"""
