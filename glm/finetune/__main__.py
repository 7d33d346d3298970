from glm.finetune import cli

cli()
