//! What does the admin API promise? Its OpenAPI 3.0 document (checked in as
//! `openapi.json`, served at `GET /v1/openapi.json`); a test keeps it in step
//! with the router's routes.

use axum::http::header;
use axum::response::IntoResponse;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = vec![];
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys().filter(|m| *m != "parameters") {
                documented.push((method.clone(), path.clone()));
            }
        }
        let mut routes: Vec<(String, String)> =
            super::super::admin_api::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        routes.sort();
        documented.sort();
        assert_eq!(routes, documented);
    }
}
