"""Everything end to end: evaluation settings and stages, the evaluate driver, querying with
photos, the HTML report and the demo museum."""
