//go:build tools

// Package tools records the Regal command as a dependency of this module.
package tools

import _ "github.com/open-policy-agent/regal"
