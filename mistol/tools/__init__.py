"""`mistol exec FILE` (`exec_cli`): run a file the way the model's code runs, in the sandbox."""
