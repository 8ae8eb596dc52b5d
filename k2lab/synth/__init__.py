"""Agentic data synthesis: tool specs, tasks with rubrics, simulators, trajectories, judge + human filter."""
