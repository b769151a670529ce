"""Evaluation tasks, one module per concern:

- task.py      Task (documents → items of requests → per-item scores) and named request groups
- outputs.py   output types (multiple_choice, loglikelihood, loglikelihood_rolling, generate_until)
- fewshot.py   few-shot samplers
- templates.py doc_to_text / doc_to_target / doc_to_choice templates and their errors
- filters.py   answer filters for generation tasks
- files.py     finding a task's files
- yaml.py      tasks from lm-evaluation-harness YAML files
- builtin/     the built-in benchmarks, each reading its published file layout
"""
