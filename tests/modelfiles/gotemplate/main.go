// Command gotemplate renders an Ollama TEMPLATE with Go's text/template the way Ollama's chat endpoint does.
//
// stdin:  {"template": "...", "cases": [{"system": "...", "messages": [{"role": "...", "content": "..."}]}]}
// stdout: [{"output": "...", "error": "..."}] in case order; exit status 2 when the template does not parse.
//
// Per case, as Ollama does: a non-empty Modelfile SYSTEM becomes a leading system message when the
// first message is not one; consecutive messages of one role are merged with "\n\n"; the template runs
// with missingkey=zero over System (all system contents joined), Messages, Tools, Response and Think.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"time"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type testCase struct {
	System   string    `json:"system"`
	Messages []message `json:"messages"`
}

type request struct {
	Template string     `json:"template"`
	Cases    []testCase `json:"cases"`
}

type result struct {
	Output string `json:"output"`
	Error  string `json:"error"`
}

// The functions Ollama's templates may call; Forge's templates use none of them.
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":   func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
}

func collate(msgs []message) (string, []*message) {
	var system []string
	var merged []*message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(merged); n > 0 && merged[n-1].Role == m.Role {
			merged[n-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	return strings.Join(system, "\n\n"), merged
}

func render(t *template.Template, c testCase) result {
	msgs := c.Messages
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]message{{Role: "system", Content: c.System}}, msgs...)
	}
	system, merged := collate(msgs)
	var b strings.Builder
	err := t.Execute(&b, map[string]any{
		"System":   system,
		"Messages": merged,
		"Tools":    nil,
		"Response": "",
		"Think":    false,
	})
	if err != nil {
		return result{Error: err.Error()}
	}
	return result{Output: b.String()}
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad request:", err)
		os.Exit(1)
	}
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(2)
	}
	results := make([]result, len(req.Cases))
	for i, c := range req.Cases {
		results[i] = render(t, c)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
